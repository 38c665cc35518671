"""Shared fixtures: the ../shared folder, a tiny random Qwen3 checkpoint, small text files, and an in-process CLI
runner whose results are cached per argument list for the whole session (a quantize run costs seconds)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
MINI = SHARED / "models" / "qwen3-mini"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Tiny random Qwen3. hidden and intermediate are multiples of 128 because `--weights block` pairs with dynamic
# group-128 activation quantization, which needs every Linear's input width to divide by 128 (as in real Qwen3);
# k/v_proj have N = 2 * 32 = 64 < 128, so block scales still cover a partial block.
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


def pytest_configure(config) -> None:
    # Tiny matmuls on a shared 2-core machine: torch's default of one OpenMP thread per core spends most of its
    # time spinning against other processes (measured 0.41 s vs 0.006 s for one tiny forward). One thread by
    # default; QWENQUANT_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("QWENQUANT_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` skip, with the reason, where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the read-only ../shared folder beside the repo is absent)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED, "../shared")


@pytest.fixture(scope="session")
def mini_model() -> Path:
    return _need(MINI, "trained fixture model qwen3-mini")


def _paragraphs(limit_chars: int, skip: int = 0) -> list[str]:
    """English paragraphs from the calibration set shipped in the repo (not ../shared)."""
    lines = (REPO_ROOT / "calibration" / "en.jsonl").read_text(encoding="utf-8").splitlines()
    out, total = [], 0
    for line in lines[skip:]:
        text = json.loads(line)["text"]
        out.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return out


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """~2.7 kB of text: about 5 windows of 128 tokens, so KL/verification run on few tokens (fast)."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n\n".join(_paragraphs(2600)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    """A .txt calibration file (paragraphs split on blank lines), ~6k tokens: enough for 4 x 64, too few for 1000 x 2048."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(_paragraphs(20000, skip=40)) + "\n", encoding="utf-8")
    return path


def build_tiny_qwen3(folder: Path, tokenizer_src: Path, seed: int = 0, tie: bool = True, **overrides) -> Path:
    """Random Qwen3ForCausalLM saved as bf16 safetensors with the qwen3-mini tokenizer (vocab 8192)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=8192, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                      **(TINY | overrides))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so folding into them is actually exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    for f in TOKENIZER_FILES:
        if (tokenizer_src / f).exists():
            shutil.copy(tokenizer_src / f, folder / f)
    return folder


# 3 layers: 0 and 2 sparse (8 experts, top-2), 1 dense (mlp_only_layers). hidden 128 so the attention Linears match
# the dense tiny model; expert intermediate 64 (INT runs use --group-size 32).
MOE = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
           mlp_only_layers=[1], norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False,
           bos_token_id=0, eos_token_id=2, pad_token_id=0)

def build_tiny_moe(seed: int = 0):
    """Random bf16 Qwen3-MoE whose layer-0 router never picks expert 0: its logit row is 0 while two pairs of rows
    (v, -v), (u, -u) give two logits max(+-v.x), max(+-u.x) > 0 for every token."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        w = model.model.layers[0].mlp.gate.weight
        v, u = torch.randn(2, w.shape[1])
        w[0], w[1], w[2], w[3], w[4] = 0, v, -v, u, -u
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """Tiny random Qwen3 folder (2 layers, hidden 128, GQA 4/2, head_dim 32, tied embeddings, bf16)."""
    _need(MINI, "qwen3-mini (its tokenizer is reused by the tiny random model)")
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3", MINI)


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    out_dir: Path | None = None

    @property
    def error_lines(self) -> list[str]:
        return [l for l in self.err.splitlines() if l.startswith("qwenquant: error:")]


def run_cli(args: list[str]) -> CliResult:
    """`qwenquant.cli.main(args)` in-process, capturing what it prints through sys.stdout / sys.stderr."""
    from qwenquant.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def small_args(model: Path, calib: Path, eval_text: Path) -> list[str]:
    return ["--model", str(model), "--calib", str(calib), "--num-samples", "4", "--seq-len", "64",
            "--eval-windows", "1", "--eval-window", "128", "--eval-text", str(eval_text), "--device", "cpu"]


@pytest.fixture(scope="session")
def fp8_run(tiny_qwen3, calib_txt, eval_text, tmp_path_factory):
    """fp8_run("--weights", "block", ...) -> CliResult of `qwenquant fp8` on the tiny model, run once per session
    per argument list (with --quiet), output in a fresh folder `out_dir`."""
    cache: dict[tuple[str, ...], CliResult] = {}
    root = tmp_path_factory.mktemp("fp8-runs")

    def run(*flags: str) -> CliResult:
        if flags not in cache:
            out = root / f"run{len(cache)}" / "out"
            res = run_cli(["fp8", *small_args(tiny_qwen3, calib_txt, eval_text), "--out", str(out), "--quiet", *flags])
            res.out_dir = out
            cache[flags] = res
        return cache[flags]

    return run


@pytest.fixture(scope="session")
def cli():
    """The in-process CLI runner: cli([...]) -> CliResult(code, out, err)."""
    return run_cli


@pytest.fixture(scope="session")
def tiny_args(tiny_qwen3, calib_txt, eval_text) -> list[str]:
    """Fast flags for the tiny model (no --out)."""
    return small_args(tiny_qwen3, calib_txt, eval_text)
