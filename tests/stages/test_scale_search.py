"""Scale search: the pure searches (`qwenquant.quant.scale_search`) and `--scale-search` end to end: the choices land
in recipe.yaml and the report, and re-running that recipe reproduces the checkpoint bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from qwenquant.quant import fp8 as fp8q
from qwenquant.quant import intq
from qwenquant.quant import scale_search as ss
from qwenquant.quant import smooth as sq
from qwenquant.stages.fp8 import FP8Stage
from qwenquant.recipe import Recipe
from qwenquant.stages.rtn import RTNStage
from qwenquant.stages.smooth import SmoothStage


def _int4(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-channel symmetric INT4 with the range shrunk by `ratio` (any quantizer callable works)."""
    return intq.quantize_rtn(w, 4, -1, True, clip_ratio=ratio, scale_dtype=torch.float32).dequantize()


def test_weight_output_error_matches_the_direct_product() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(16, 32), torch.randn(100, 32)
    w_hat = _int4(w, 1.0)
    direct = float((x @ (w_hat - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert ss.weight_output_error(w, w_hat, ss.gram(x)) == pytest.approx(direct, rel=1e-4)


def test_clip_search_clips_an_outlier_whose_input_is_quiet() -> None:
    """One huge weight in a column whose input is ~0: clipping it costs nothing in the output but refines the grid
    of the rest of its row, so a ratio < 1 wins; with the outlier's input active, 1.0 wins."""
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.1
    w[:, 5] = 2.0  # outlier column
    x = torch.randn(512, 64)
    x[:, 5] *= 1e-3
    res = ss.search_clip(w, x, ss.CLIP_GRID_FINE, _int4)
    assert res.best < 1.0 and res.best_error < res.error_at(1.0)
    assert res.grid == list(ss.CLIP_GRID_FINE) and len(res.errors) == len(res.grid)
    x[:, 5] = torch.randn(512) * 3.0
    assert ss.search_clip(w, x, ss.CLIP_GRID_COARSE, _int4).best == 1.0


def test_clip_search_paths_agree_and_ties_keep_the_fixed_rule() -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    few, many = torch.randn(20, 64), None  # 20 tokens < K = 64: the direct path; duplicated 4x: the Gram path
    many = few.repeat(4, 1)
    a = ss.search_clip(w, few, ss.CLIP_GRID_COARSE, _int4)
    b = ss.search_clip(w, many, ss.CLIP_GRID_COARSE, _int4)
    assert a.best == b.best and a.errors == pytest.approx(b.errors, rel=1e-4)
    same = ss.search_clip(w, many, (1.0, 0.9, 0.8), lambda v, r: v.round())  # ignores the ratio: all tied
    assert same.best == 1.0


def test_choose_grid_is_fine_for_sensitive_units() -> None:
    assert ss.choose_grid(0.2, 0.1, ss.CLIP_GRID_COARSE, ss.CLIP_GRID_FINE) == ss.CLIP_GRID_FINE
    assert ss.choose_grid(0.05, 0.1, ss.CLIP_GRID_COARSE, ss.CLIP_GRID_FINE) == ss.CLIP_GRID_COARSE
    assert ss.choose_grid(0.05, None, ss.ALPHA_GRID_COARSE, ss.ALPHA_GRID_FINE) == ss.ALPHA_GRID_FINE
    assert ss.CLIP_GRID_FINE[0] == 1.0 and ss.CLIP_GRID_FINE[-1] == 0.8 and len(ss.CLIP_GRID_FINE) == 21


def test_alpha_search_prefers_smoothing_for_activation_outliers_under_static_fp8() -> None:
    """Static per-tensor FP8 inputs with a few outlier channels: without smoothing the other channels fall into
    FP8's subnormals; some alpha > 0 lowers the output error, and exact quantizers make every alpha error-free."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, :3] *= 3000.0
    ws = [torch.randn(32, 64) * 0.05, torch.randn(16, 64) * 0.05]
    absmax = x.abs().amax(0)

    def quantize_input(xs, s):
        return fp8q.fake_quantize_activation(xs, "tensor", fp8q.static_input_scale((absmax / s).amax(), torch.float32))

    def fp8_weight(w):
        return fp8q.quantize_fp8(w, "channel", scale_dtype=torch.float32).dequantize()

    grid = (0.0, 0.3, 0.5, 0.7)
    errors = ss.alpha_errors(x, ws, grid, lambda a: sq.smoothing_factors(absmax, ws, a), fp8_weight, quantize_input)
    res = ss.search_alpha(grid, [errors])
    # measured: 1.33e-3 at alpha 0 -> 8.6e-4 at alpha 0.3 (0.65x)
    assert res.best > 0.0 and res.best_error < 0.8 * errors[0], errors
    exact = ss.alpha_errors(x, ws, grid, lambda a: sq.smoothing_factors(absmax, ws, a), lambda w: w, lambda v, s: v)
    assert max(exact) < 1e-10
    # several mappings: the sum decides; a tie keeps the first (configured) alpha
    assert ss.search_alpha((0.5, 0.3), [[1.0, 0.2], [1.0, 1.5]]).best == 0.3  # totals 2.0 vs 1.7
    assert ss.search_alpha((0.5, 0.3), [[1.0, 1.0]]).best == 0.5


def test_recipe_validates_search_fields() -> None:
    with pytest.raises(ValueError, match="fp8.clip.model.layers.0.mlp.down_proj: must be a number in"):
        FP8Stage(clip={"model.layers.0.mlp.down_proj": 0.0})
    with pytest.raises(ValueError, match="either clip_search or per-Linear clip"):
        FP8Stage(clip={"a": 0.9}, clip_search=True)
    with pytest.raises(ValueError, match="smooth.layer_alpha"):
        SmoothStage(layer_alpha={"0": 0.5})
    with pytest.raises(ValueError, match="alpha_search measures the quantizer.s weight and activation error; it needs the fp8 or int8"):
        Recipe(stages=[SmoothStage(alpha_search=True), RTNStage()])
    assert SmoothStage(alpha=0.4, layer_alpha={1: 0.7}).alpha_for(1) == 0.7
    assert SmoothStage(alpha=0.4, layer_alpha={1: 0.7}).alpha_for(0) == 0.4


# ---- CLI ------------------------------------------------------------------------------------------------------------


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.mark.parametrize("flags", [("--smooth", "--activations", "static"), ("--weights", "tensor")],
                         ids=["smooth-static", "tensor"])
def test_scale_search_lands_in_recipe_and_replays_identically(cli, tiny_args, tiny_qwen3, tmp_path, flags) -> None:
    out = tmp_path / "searched"
    res = cli(["fp8", *tiny_args, "--out", out, "--quiet", "--scale-search", *flags])
    assert res.code == 0, res.err[-3000:]
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    stages = {name: cfg for st in saved["stages"] for name, cfg in st.items()}
    fp8 = stages["fp8"]
    assert fp8["clip_search"] is False
    linears = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(fp8["clip"]) == sorted(linears) and all(0.8 <= v <= 1.0 for v in fp8["clip"].values())
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["verification"]["passed"] is True
    for rep in report["layers"]:
        for n, v in rep["fp8"].items():
            assert v["clip"] == fp8["clip"][f"model.layers.{rep['layer']}.{n}"] and "clip_search" in v
    if "--weights" in flags:  # per-tensor: fused shards share one ratio (and one scale)
        for i in range(2):
            assert len({fp8["clip"][f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1
    if "--smooth" in flags:
        assert stages["smooth"]["alpha_search"] is False and sorted(stages["smooth"]["layer_alpha"]) == [0, 1]
        for rep in report["layers"]:
            assert rep["smooth"]["alpha_search"]["alpha"] == stages["smooth"]["layer_alpha"][rep["layer"]]
    assert "## Scale search" in (out / "REPORT.md").read_text()

    again = tmp_path / "replayed"
    res2 = cli(["run", out / "recipe.yaml", "--model", tiny_qwen3, "--out", again, "--quiet"])
    assert res2.code == 0, res2.err[-3000:]
    assert yaml.safe_load((again / "recipe.yaml").read_text()) == saved  # nothing searched, same values
    first, second = _tensors(out), _tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), [k for k in first if not torch.equal(first[k], second[k])]


def test_int_scale_search_lands_in_recipe_and_replays_identically(cli, tiny_args, tiny_qwen3, tmp_path) -> None:
    """GPTQ --scale-search: per-Linear clip ratios judged by the RTN output error, saved, replayed bit for bit."""
    out = tmp_path / "searched"
    res = cli(["gptq", *tiny_args, "--out", out, "--quiet", "--scale-search", "--group-size", "64"])
    assert res.code == 0, res.err[-3000:]
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    gptq = next(st["gptq"] for st in saved["stages"] if "gptq" in st)
    assert gptq["clip_search"] is False and len(gptq["clip"]) == 14
    assert all(0.8 <= v <= 1.0 for v in gptq["clip"].values()) and min(gptq["clip"].values()) < 1.0
    report = json.loads((out / "qwenquant_report.json").read_text())
    for rep in report["layers"]:
        for n, v in rep["gptq"].items():
            assert v["clip_search"]["clip"] == gptq["clip"][f"model.layers.{rep['layer']}.{n}"]
            assert v["clip_search"]["error"] <= v["clip_search"]["error_at_1"]
    again = tmp_path / "replayed"
    res2 = cli(["run", out / "recipe.yaml", "--model", tiny_qwen3, "--out", again, "--quiet"])
    assert res2.code == 0, res2.err[-3000:]
    first, second = _tensors(out), _tensors(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    plain = tmp_path / "plain"
    assert cli(["gptq", *tiny_args, "--out", plain, "--quiet", "--group-size", "64"]).code == 0
    assert any(not torch.equal(first[k], v) for k, v in _tensors(plain).items())  # the clip ratios took effect


def test_int_recipe_validates_clip_fields() -> None:
    from qwenquant.stages.gptq import GPTQStage

    with pytest.raises(ValueError, match="either clip_search or per-Linear clip"):
        GPTQStage(clip={"a": 0.9}, clip_search=True)
    with pytest.raises(ValueError, match="rtn.clip"):
        RTNStage(clip={"model.layers.0.mlp.down_proj": 1.5})


def test_fp8_granularity_search_mixes_channel_and_block_in_one_checkpoint(cli, tiny_args, tiny_qwen3, tmp_path) -> None:
    """Default fp8 (channel, dynamic, compressed-tensors) + --scale-search: each fused group gets channel or block
    by output error; the checkpoint lists each Linear in exactly one config group, reloads bit-exact, replays."""
    out = tmp_path / "searched"
    res = cli(["fp8", *tiny_args, "--out", out, "--quiet", "--scale-search"])
    assert res.code == 0, res.err[-3000:]
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    fp8 = next(st["fp8"] for st in saved["stages"] if "fp8" in st)
    assert fp8["granularity_search"] is False and len(fp8["granularity"]) == 14
    assert set(fp8["granularity"].values()) <= {"channel", "block"}
    for i in range(2):  # one scheme per vLLM fused module
        assert len({fp8["granularity"][f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert len({fp8["granularity"][f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up")}) == 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(fp8["granularity"])  # every Linear in exactly one group
    for g in qc["config_groups"].values():
        assert all(fp8["granularity"][t] == g["weights"]["strategy"] for t in g["targets"])
        assert g["input_activations"]["strategy"] == ("group" if g["weights"]["strategy"] == "block" else "token")
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["loader"] == "transformers.AutoModelForCausalLM"
    for rep in report["layers"]:
        for n, v in rep["fp8"].items():
            errs = v["granularity_search"]["errors"]
            assert v["granularity_search"]["granularity"] == min(errs, key=lambda g: (errs[g], g != "channel"))
    again = tmp_path / "replayed"
    assert cli(["run", out / "recipe.yaml", "--model", tiny_qwen3, "--out", again, "--quiet"]).code == 0
    first, second = _tensors(out), _tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_granularity_fields_validate() -> None:
    with pytest.raises(ValueError, match="needs weights: channel and activations: dynamic"):
        FP8Stage(activations="static", granularity_search=True)
    with pytest.raises(ValueError, match="fp8.granularity.x"):
        FP8Stage(granularity={"x": "tensor"})
    assert FP8Stage(granularity={"a": "block"}).weights_for("a") == "block"
    assert FP8Stage(granularity={"a": "block"}).weights_for("b") == "channel"
