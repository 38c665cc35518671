"""Distributed runs on 2 gloo ranks (CPU): the collectives' arithmetic against one process, whole runs through
`--nproc 2` against the same run in one process, and the refusals (one line, exit 2, no output folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from qwenquant.distributed import World
from qwenquant.errors import BadInputError
from qwenquant.quant import gptq as gptqq
from qwenquant.recipe_builder import quantize_recipe
from qwenquant.runner.ranks import check_ranks, check_resume, check_shardable

REPO = Path(__file__).resolve().parents[2]
K, ROWS, TOKENS = 96, 70, 300  # ROWS odd per rank share: 35 + 35; tokens split 150 + 150


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, K, generator=g)
    x[:, 3] *= 20.0  # an outlier channel
    weights = [torch.randn(40, K, generator=g) * 0.05, torch.randn(ROWS - 40, K, generator=g) * 0.05]
    return x, weights


def _hessian_sum(x: torch.Tensor, batch: int = 50) -> tuple[torch.Tensor, int]:
    """The float64 sum of X_b^T X_b over batches of `batch` tokens, and the token count (as gptq_layer observes)."""
    S = None
    for i in range(0, x.shape[0], batch):
        S = gptqq.accumulate_hessian_sum(S, x[i:i + batch])
    return S, x.shape[0]


def _rank_main(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: this rank's half of the tokens -> combined Hessian and maxima, then the
    weight-parallel GPTQ solve on the combined Hessian; rank 0 saves what it got."""
    from types import SimpleNamespace

    from qwenquant.stages.gptq import GPTQStage, combined_hessian, solve_shared

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world = World(rank, 2, "gloo")
        x, weights = _data()
        mine = x[world.shard(TOKENS)]
        S_r, n_r = _hessian_sum(mine)
        layer = SimpleNamespace(weight=torch.empty(1, K))
        ctx = SimpleNamespace(world=world, device=torch.device("cpu"), linear=lambda _name: layer)
        H = combined_hessian(ctx, "q", S_r, n_r)
        amax = world.max_(mine.abs().amax(dim=0).contiguous())
        cfg = GPTQStage(bits=4, group_size=32)
        results = solve_shared(world, weights, H, cfg, [1.0, 1.0])
        asym = solve_shared(world, weights, H, GPTQStage(bits=4, group_size=32, symmetric=False), [1.0, 1.0])
        if rank == 0:
            torch.save({"H": H, "amax": amax, "q": [r.record.q for r in results],
                        "scale": [r.record.scale for r in results], "loss": [r.loss for r in results],
                        "pre": [r.pre_rounding for r in results],
                        "asym": [(r.record.q, r.record.scale, r.record.zero_point) for r in asym]}, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_combine_statistics_and_split_gptq_rows(tmp_path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=2, join=True)
    from types import SimpleNamespace

    from qwenquant.stages.gptq import combined_hessian

    got = torch.load(out)
    x, weights = _data()
    one = SimpleNamespace(world=World(), device=torch.device("cpu"), linear=None)
    H = combined_hessian(one, "q", *_hessian_sum(x))  # one process: the same batches of 50, added in turn
    print(f"combined Hessian vs one process: {int((got['H'] != H).sum())} of {H.numel()} entries differ")
    assert torch.equal(got["H"], H)  # float64 sums of the same float32 batch products, rounded once
    assert torch.equal(got["amax"], x.abs().amax(dim=0))  # the max does not depend on the order
    from qwenquant.stages.gptq import GPTQStage

    single = gptqq.quantize_weights_shared(weights, got["H"], GPTQStage(bits=4, group_size=32), scale_dtype=torch.float32)
    for i, res in enumerate(single):  # every row solved on its own: splitting rows over ranks changes no bit
        assert torch.equal(got["q"][i], res.record.q) and torch.equal(got["scale"][i], res.record.scale)
        assert torch.equal(got["pre"][i], res.pre_rounding)
        assert got["loss"][i] == pytest.approx(res.loss, rel=1e-6)
    asym = gptqq.quantize_weights_shared(weights, got["H"], GPTQStage(bits=4, group_size=32, symmetric=False),
                                         scale_dtype=torch.float32)
    for (q, scale, zero), res in zip(got["asym"], asym):  # zero points travel in the same exchange of bytes
        assert zero is not None and zero.dtype == res.record.zero_point.dtype
        assert torch.equal(q, res.record.q) and torch.equal(zero, res.record.zero_point)
        assert torch.equal(scale, res.record.scale)


def test_shards_are_contiguous_whole_batches_when_possible() -> None:
    shards = [World(r, 2).shard(20, 8) for r in range(2)]
    assert shards == [slice(0, 8), slice(8, 20)]  # 3 batches of 8: one rank takes 2
    assert [World(r, 3).shard(4, 8) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 4)]  # < 3 batches
    assert World(0, 2).counts(20, 8) == [8, 12] and World(0, 1).shard(5, 8) == slice(0, 5)


class _Disagreeing(World):
    """A 2-rank world whose rank 1 reports another value (no process group needed)."""

    def gather_objects(self, obj) -> list:
        return [obj, "something else"]


def test_refusals_before_any_work(tiny_qwen3) -> None:
    recipe = quantize_recipe({"model": {"id": str(tiny_qwen3)}, "gptq": {}})
    files = sorted(tiny_qwen3.glob("*.safetensors"))
    two = World(0, 2, "gloo")
    check_ranks(_Agreeing(0, 2, "gloo"), recipe, files, streamed=False)  # allowed
    with pytest.raises(BadInputError, match="uses none"):
        check_ranks(two, recipe, files, streamed=True)
    mixed = quantize_recipe({"model": {"id": str(tiny_qwen3)}, "gptq": {}, "mixed_precision": {"keep_sensitive": 2}})
    with pytest.raises(BadInputError, match="stage mixed_precision does not run on several ranks"):
        check_ranks(two, mixed, files, streamed=False)
    with pytest.raises(BadInputError, match=r"ranks \[1\] see a different recipe"):
        check_ranks(_Disagreeing(0, 2, "gloo"), recipe, files, streamed=False)
    with pytest.raises(BadInputError, match="3 ranks but only 2 calibration samples"):
        check_shardable(World(0, 3, "gloo"), torch.zeros(2, 8, dtype=torch.long))


class _Agreeing(World):
    """A world of several ranks that all answer as this one (no process group needed)."""

    def gather_objects(self, obj) -> list:
        return [obj] * self.size


def test_resume_checks_the_journals_world_size_and_shards(tmp_path) -> None:
    """--resume: a journal of another number of ranks is refused naming both numbers and the fix; a rank without
    its shard of the last finished layer's activations is refused; every rank raises the same line."""
    journal = tmp_path / "_journal"
    journal.mkdir()
    (journal / "journal.json").write_text(json.dumps({"version": 2, "fingerprint": "f", "world_size": 2,
                                                      "layers_done": 1, "stage_seconds": {}, "inputs": True}))
    for world, fix in ((_Agreeing(0, 3, "gloo"), "with --nproc 2"), (World(), "with --nproc 2")):
        with pytest.raises(BadInputError) as err:
            check_resume(world, tmp_path, "f")
        line = str(err.value)
        assert "interrupted run of 2 ranks" in line and f"this run has {'3 ranks' if world.size == 3 else '1 process'}" in line
        assert fix in line and "without --resume to start over" in line and "\n" not in line, line
    with pytest.raises(BadInputError, match=r"has no inputs-00000-rank1of2 \(rank 1's activations\)"):
        check_resume(_Agreeing(1, 2, "gloo"), tmp_path, "f")
    with pytest.raises(BadInputError, match="different recipe or model"):
        check_resume(_Agreeing(0, 2, "gloo"), tmp_path, "another fingerprint")
    (journal / "journal.json").write_text(json.dumps({"version": 2, "fingerprint": "f", "layers_done": 1,
                                                      "stage_seconds": {}, "inputs": True}))  # one process's
    with pytest.raises(BadInputError, match="1 process but this run has 2 ranks; resume it in one process"):
        check_resume(_Agreeing(0, 2, "gloo"), tmp_path, "f")


def test_launch_refusals_are_one_line(cli, tiny_args, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    res = cli(["gptq", *tiny_args, "--out", out, "--nproc", "2"])
    assert res.code == 2 and len(res.error_lines) == 1 and "drop --nproc" in res.error_lines[0], res.err
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables half set: no MASTER_ADDR, MASTER_PORT, LOCAL_RANK
    res = cli(["gptq", *tiny_args, "--out", out])
    assert res.code == 2 and "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set" in res.error_lines[0], res.err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow  # ~25 s each idle: three Python processes (launcher + 2 ranks) import torch and transformers
@pytest.mark.parametrize("scheme", [["fp8", "--activations", "static", "--smooth", "--scale-search", "--kv-cache", "fp8",
                                     "--kv-cache-strategy", "head"],
                                    ["gptq", "--group-size", "32"],
                                    ["awq", "--group-size", "32"],
                                    ["gptq", "--group-size", "32", "--compensate", "--compensate-steps", "10"]])
def test_two_gloo_ranks_match_one_process(scheme, cli, tiny_qwen3, calib_txt, eval_text, tmp_path) -> None:
    """16 samples = 2 batches of 8: each rank forms one of the single process's batches. Maxima (static FP8,
    smoothing) and the sampled inputs of the searches (clip ratios, smoothing alpha; AWQ's too, whose alpha grid and
    clip rows the ranks split) then give the same bits; so does GPTQ: its Hessian is a float64 sum of the same float32 batch products, rounded to float32 once
    (here each rank's partial sum is one batch: exact), and the rows the ranks solve are the single solve's.
    Compensation steps on the ranks' averaged gradients (one minibatch per rank and step, as DDP): the KL vs the
    source must stay as good, and layer 0's output error before compensation (the same quantized layer, summed
    over the ranks' samples) must match."""
    args = [*scheme, "--model", tiny_qwen3, "--calib", calib_txt, "--num-samples", "16", "--seq-len", "64",
            "--eval-windows", "1", "--eval-window", "128", "--eval-text", eval_text, "--kl-tokens", "512",
            "--device", "cpu", "--quiet"]
    single = cli([*args, "--out", tmp_path / "n1"])  # in this process, one torch thread (conftest) like each rank
    assert single.code == 0, single.err
    two = subprocess.run([sys.executable, "-m", "qwenquant", *map(str, args), "--out", str(tmp_path / "n2"),
                          "--nproc", "2"], cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    one, two = (load_file(tmp_path / f"n{n}" / "model.safetensors") for n in (1, 2))
    reports = [json.loads((tmp_path / f"n{n}" / "qwenquant_report.json").read_text()) for n in (1, 2)]
    ranks = reports[1]["ranks"]
    assert ranks["world_size"] == 2 and ranks["backend"] == "gloo" and ranks["samples_per_rank"] == [8, 8]
    assert len(ranks["peak_host_bytes_per_rank"]) == 2 and "ranks" not in reports[0]
    assert one.keys() == two.keys()
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    kl = [r["evaluation"]["kl_vs_source"]["mean_kl"] for r in reports]
    print(f"{scheme[0]}: {len(differ)}/{len(one)} tensors differ; mean KL 1 rank {kl[0]:.3e}, 2 ranks {kl[1]:.3e}")
    if "--compensate" not in scheme:
        assert differ == []
    else:
        assert all(k.endswith(("weight_packed", "weight_scale", "norm.weight")) for k in differ)
        assert abs(kl[1] - kl[0]) < 0.1 * kl[0]
        comp = [r["layers"][0]["compensate"] for r in reports]
        assert comp[0]["samples"] == comp[1]["samples"] == 16
        assert comp[1]["output_error_before"] == pytest.approx(comp[0]["output_error_before"], rel=1e-5)


@pytest.mark.slow  # a 1-process and a 2-rank run: ~40 s idle
def test_two_ranks_offloaded_match_one_resident_process(cli, tiny_qwen3, calib_txt, eval_text, tmp_path) -> None:
    """--offload-dir with 2 ranks: each rank holds only the resident tensors and the decoder layer in use (its own
    work dir under DIR; only rank 0 writes finished layers), and the checkpoint is the resident single process's bit
    for bit; DIR (created by the run) is gone afterwards."""
    args = ["gptq", "--group-size", "32", "--model", tiny_qwen3, "--calib", calib_txt, "--num-samples", "16",
            "--seq-len", "64", "--eval-windows", "1", "--eval-window", "128", "--eval-text", eval_text,
            "--kl-tokens", "512", "--device", "cpu", "--quiet"]
    single = cli([*args, "--out", tmp_path / "n1"])
    assert single.code == 0, single.err
    offload = tmp_path / "offload"
    two = _nproc(args, tmp_path / "n2", "--offload-dir", str(offload))
    assert two.returncode == 0, two.stderr
    one, two = (load_file(tmp_path / f"n{n}" / "model.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    report = json.loads((tmp_path / "n2" / "qwenquant_report.json").read_text())
    assert report["ranks"]["world_size"] == 2 and report["memory"]["offload_dir"] == str(offload.resolve())
    assert not offload.exists()


def _nproc(args: list, out: Path, *more: str, kill: str | None = None, n: int = 2) -> subprocess.CompletedProcess:
    """`qwenquant ARGS --out OUT MORE --nproc N` in a subprocess (QWENQUANT_FAULT_KILL_AFTER_LAYER=`kill`)."""
    env = {k: v for k, v in os.environ.items() if k != "QWENQUANT_FAULT_KILL_AFTER_LAYER"} | {"OMP_NUM_THREADS": "1"}
    if kill is not None:
        env["QWENQUANT_FAULT_KILL_AFTER_LAYER"] = kill
    return subprocess.run([sys.executable, "-m", "qwenquant", *map(str, args), "--out", str(out), *more,
                           "--nproc", str(n)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _journal_files(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in sorted((folder / "_journal").iterdir())}


@pytest.mark.slow  # three 2-rank runs and a refused 3-rank one: ~90 s idle
def test_a_killed_rank_leaves_a_journal_that_resumes_to_the_identical_checkpoint(cli, tiny_qwen3, calib_txt,
                                                                                  eval_text, tmp_path) -> None:
    """Rank 1 is SIGKILLed while journaling the last decoder layer (its shard written, before the barrier): the run
    ends (rank 0's collective fails at once) with one line naming the dead rank and --resume, the journal counts
    layer 0 only and holds each rank's shard of its outputs; a single-process --resume is refused (exit 2, one
    line, nothing touched), and so is one on 3 ranks (every rank refuses before loading, none waits for the
    others); --resume on 2 ranks writes the uninterrupted 2-rank run's checkpoint bit for bit."""
    from safetensors.torch import load_file as load

    from qwenquant.export.writer import partial_dir

    args = ["gptq", "--group-size", "32", "--model", tiny_qwen3, "--calib", calib_txt, "--num-samples", "16",
            "--seq-len", "64", "--eval-windows", "1", "--eval-window", "128", "--eval-text", eval_text,
            "--kl-tokens", "512", "--device", "cpu", "--quiet"]
    whole = _nproc(args, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    killed = _nproc(args, out, kill="1@1")
    lines = [l for l in killed.stderr.splitlines() if l.startswith("qwenquant: error:")]
    print("killed run:", lines)
    assert killed.returncode == 1 and not out.exists(), killed.stderr[-3000:]
    assert any("rank 1 was killed by signal 9" in l and "--resume" in l for l in lines), killed.stderr[-3000:]
    meta = json.loads((partial_dir(out) / "_journal" / "journal.json").read_text())
    assert meta["layers_done"] == 1 and meta["world_size"] == 2, meta
    before = _journal_files(partial_dir(out))
    assert {"inputs-00000-rank0of2.sha256", "inputs-00000-rank1of2.sha256"} <= set(before), sorted(before)

    one = cli([*args, "--out", out, "--resume"])  # in this process: a world of one
    assert one.code == 2 and len(one.error_lines) == 1, one.err
    assert "interrupted run of 2 ranks but this run has 1 process" in one.error_lines[0], one.error_lines
    assert "--nproc 2" in one.error_lines[0] and "without --resume" in one.error_lines[0]
    assert _journal_files(partial_dir(out)) == before and not out.exists()
    three = _nproc(args, out, "--resume", n=3)
    lines = [l for l in three.stderr.splitlines() if l.startswith("qwenquant: error:")]
    assert three.returncode == 2 and len(lines) == 1, three.stderr[-3000:]
    assert "interrupted run of 2 ranks but this run has 3 ranks; resume it with --nproc 2" in lines[0], lines
    assert _journal_files(partial_dir(out)) == before and not out.exists()

    resumed = _nproc(args, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not partial_dir(out).exists()
    reports = [json.loads((d / "qwenquant_report.json").read_text()) for d in (tmp_path / "whole", out)]
    assert reports[1]["resumed_after_layers"] == 1 and reports[1]["ranks"]["world_size"] == 2
    assert reports[1]["verification"]["passed"]
    a, b = (load(d / "model.safetensors") for d in (tmp_path / "whole", out))
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)))]
    print(f"resumed vs uninterrupted 2-rank run: {len(differ)}/{len(a)} tensors differ")
    assert a.keys() == b.keys() and differ == []
    assert reports[0]["evaluation"]["kl_vs_source"] == reports[1]["evaluation"]["kl_vs_source"]


def test_dry_run_knows_ranks(cli, tiny_args, tmp_path) -> None:
    """--dry-run --nproc 2: the quantize phase halves except what every rank repeats (GPTQ's factorizations and
    per-column steps), rank-0-only phases do not divide, per-rank memory is reported."""
    docs = {}
    for n in (1, 2):
        res = cli(["gptq", *tiny_args, "--out", tmp_path / "out", "--dry-run", "--json", "--nproc", str(n)])
        assert res.code == 0, res.err
        docs[n] = json.loads(res.out)
    one, two = docs[1], docs[2]
    assert one["ranks"] is None and two["ranks"]["world_size"] == 2 and not (tmp_path / "out").exists()
    # each run probes the machine afresh: compare each estimate with its own single-process numbers
    t = two["timings_s"]
    r = two["ranks"]
    assert t["total"] == pytest.approx(r["total_s_one_process"] - r["quantize_s_one_process"] + t["quantize"], rel=1e-9)
    repeated = two["repeated_s"]["gptq"]
    assert 0 < repeated < two["timings_s"]["stages"]["gptq"]
    assert r["quantize_s_one_process"] / 2 < t["quantize"] < r["quantize_s_one_process"]
    assert t["quantize"] == pytest.approx(sum(t["stages"].values()), rel=1e-9)
    assert 0 < two["ranks"]["peak_host_bytes_per_rank"] <= two["memory"]["peak_host_bytes"]
    assert two["ranks"]["peak_host_bytes_this_machine"] == 2 * two["ranks"]["peak_host_bytes_per_rank"]
