"""ONNX models for onnxruntime through onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`, run
in a subprocess), with the traps of its wheel and of its options caught before it runs.

What the builder (onnxruntime-genai 0.18, read from its source) does with each input:
- an unquantized Qwen3 folder: `fp32` keeps float MatMuls; `int4` / `int8` quantize every Linear with onnxruntime's
  own blockwise round-to-nearest quantizer (MatMulNBitsQuantizer, symmetric, block `group_size`): the runtime's
  own quantizer, the baseline for ours.
- a GPTQ v1 (`quant_method: gptq`) or AWQ GEMM (`awq`) folder: its loader unpacks qweight / qzeros / scales,
  dequantizes in float16 and rounds back to codes (round((w + z*s) / s)), and packs them into `MatMulNBits`
  (B uint8 [N, K/block, block*bits/8], float scales [N, K/block], packed uint8 zero points): the method's codes,
  which verification (qwenquant/eval/onnx_verify.py) checks weight by weight.
q/k/v are fused into one `qkv_proj` MatMul per layer. Like every qwenquant output, embeddings and lm_head stay
float (the builder would otherwise round them with its own RTN): nodes `/lm_head/MatMul` and
`/model/embed_tokens/Gather` are excluded from quantization, and tied embeddings stay one table.

Traps, each refused (or worked around) with a one-line error naming the fix:
- the wheel does not declare `onnx_ir` (and `onnx`), which the builder imports first: checked before building;
- `--qdq` with tied embeddings: the builder adds `Gather` to the op types to quantize, and onnxruntime's QDQ
  quantizer asserts on every Gather ("Gather only supports QOperator format"): the build passes
  `shared_embeddings=false`, so the embedding table and lm_head are stored separately (both float);
- `--qdq` with int8 (the builder has no 8-bit QDQ form), `fp32` with `--qdq` (nothing to quantize), and `--qdq`
  from a GPTQ/AWQ folder (the builder's QDQ graph of a prequantized checkpoint gave KL 5.8 nats in onnxruntime on
  qwen3-mini, and no Linear could be read back from it: refused until understood; QDQ works from a bf16 folder);
- a model the builder does not know (it knows Qwen3ForCausalLM, not Qwen3MoeForCausalLM);
- a checkpoint it cannot hold: compressed-tensors INT (the builder reads compressed-tensors only as ModelOpt
  FP8/NVFP4 on CUDA), bits other than 4/8 (AWQ: 4), a group size MatMulNBits cannot take (a power of two >= 16;
  per-channel groups of 768 are not), act-order with a non-trivial g_idx (act-order `group`), or a precision other
  than the codes';
- a GPTQ folder with `desc_act: true` (qwenquant's act-order `static`, whose groups stay contiguous): the builder
  then gives every MatMulNBits a g_idx input, which onnxruntime's CPU kernel runs unpacked (about 7x slower decoding
  measured on qwen3-mini, benchmarks/results/runtimes_onnx.md) and at 8 bits not at all. The g_idx is the natural
  k // group (checked before building), so the builder reads a staged copy of the folder (links to its files, a
  config.json with `desc_act: false`): the same codes, no g_idx.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qwenquant.errors import BadInputError

PRECISIONS = ("int4", "int8", "fp32")
EPS = ("cpu", "cuda", "dml")
ARCHITECTURES = ("Qwen3ForCausalLM",)  # the builder's Qwen3 class; Qwen3-MoE has none in 0.18
FLOAT_NODES = ("/lm_head/MatMul", "/model/embed_tokens/Gather")
INSTALL_HINT = "pip install 'qwenquant[onnx]'"
# module -> the PyPI package that provides it (the builder imports all of them)
REQUIRED = {"onnxruntime_genai": "onnxruntime-genai", "onnxruntime": "onnxruntime", "onnx": "onnx",
            "onnx_ir": "onnx-ir"}


def missing_packages() -> list[str]:
    """PyPI names of the builder's imports that are not installed (onnx-ir is not a dependency of its wheel)."""
    return [pkg for mod, pkg in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def require_packages() -> None:
    missing = missing_packages()
    if missing:
        raise BadInputError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT} (or pip install "
                            f"{' '.join(missing)})")


@dataclass
class BuildPlan:
    """What one builder run is asked for, and how the folder's weights get into the model."""

    precision: str
    ep: str
    qdq: bool
    options: dict[str, str] = field(default_factory=dict)  # the builder's --extra_options
    codes: str = ""  # where the quantized weights come from, for the report
    quantized_input: bool = False
    config_changes: dict = field(default_factory=dict)  # quantization_config keys the builder reads changed


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _checkpoint_scheme(qconfig: dict) -> tuple[str, int, int]:
    """(method, bits, group size) of a GPTQ/AWQ folder; BadInputError for what the builder cannot hold."""
    method = qconfig.get("quant_method")
    if method not in ("gptq", "awq"):
        raise BadInputError(f"ONNX export reads gptq or awq checkpoints, not quant_method {method!r}: quantize with "
                            "--format gptq or --format awq, or pass the bf16 source folder")
    if method == "gptq" and qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise BadInputError(f"GPTQ checkpoint_format {qconfig.get('checkpoint_format')!r}: only v1 ('gptq') is "
                            "read; re-export with qwenquant gptq --format gptq")
    bits, group = int(qconfig.get("bits", qconfig.get("w_bit", 0))), int(qconfig.get("group_size",
                                                                                     qconfig.get("q_group_size", 0)))
    allowed = (4,) if method == "awq" else (4, 8)
    if bits not in allowed:
        raise BadInputError(f"{method} with {bits} bits: onnxruntime's MatMulNBits takes "
                            f"{' or '.join(map(str, allowed))}-bit {method} codes; quantize with --bits 4")
    if not _power_of_two(group):
        raise BadInputError(f"group size {group}: MatMulNBits blocks are powers of two >= 16; quantize with "
                            "--group-size 32, 64 or 128")
    return method, bits, group


def plan_build(config: dict, precision: str | None, ep: str, qdq: bool, group_size: int | None,
               accuracy_level: int | None) -> BuildPlan:
    """Check the folder's config.json and the options against what the builder can do; the options it gets."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise BadInputError(f"onnxruntime-genai's model builder does not know {arch} (it builds "
                            f"{', '.join(ARCHITECTURES)}); use qwenquant export gguf or --format compressed-tensors")
    if ep not in EPS:
        raise BadInputError(f"--ep {ep}: choose one of {', '.join(EPS)}")
    qconfig = config.get("quantization_config")
    options: dict[str, str] = {}
    if qconfig:
        method, bits, group = _checkpoint_scheme(qconfig)
        if group_size is not None:
            raise BadInputError("--group-size applies to a bf16 folder (the builder's own quantizer); this "
                                f"{method} folder's codes keep their group size {group}")
        held = f"int{bits}"
        if precision is not None and precision != held:
            raise BadInputError(f"--precision {precision} cannot hold this folder's {bits}-bit {method} codes: "
                                f"use --precision {held}, or export the bf16 source folder instead")
        precision = held
        codes = f"{method} codes read from the checkpoint ({bits} bits, group {group}), packed into MatMulNBits"
        if method == "gptq" and qconfig.get("desc_act"):
            config_changes = {"desc_act": False}
            codes += "; act-order groups are contiguous, so no g_idx (desc_act false for the builder)"
        else:
            config_changes = {}
    else:
        config_changes = {}
        precision = precision or "int4"
        if precision not in PRECISIONS:
            raise BadInputError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
        group = 32 if group_size is None else int(group_size)
        if precision == "fp32":
            if group_size is not None:
                raise BadInputError("--group-size applies to --precision int4/int8, not fp32")
            codes = "float32 weights (no quantization)"
        else:
            if not _power_of_two(group):
                raise BadInputError(f"--group-size {group}: MatMulNBits blocks are powers of two >= 16 (16, 32, 64, "
                                    "128, 256)")
            options["block_size"] = str(group)
            codes = (f"onnxruntime's own round-to-nearest (MatMulNBitsQuantizer, symmetric, block {group}) from the "
                     "unquantized weights")
    if qdq and qconfig:
        raise BadInputError("--qdq from a gptq/awq folder: onnxruntime-genai 0.18's QDQ form of a prequantized "
                            "checkpoint computed wrong logits in onnxruntime (KL 5.8 nats on qwen3-mini, measured); "
                            "drop --qdq, or pass the bf16 folder (onnxruntime's own RTN) for QDQ")
    if qdq and precision != "int4":
        raise BadInputError(f"--qdq holds 4-bit weights (the builder has no {precision} QDQ form); use "
                            "--precision int4 or drop --qdq")
    if precision != "fp32":
        options["nodes_to_exclude"] = ",".join(FLOAT_NODES)
        if accuracy_level is not None:
            if accuracy_level not in range(5):
                raise BadInputError(f"--accuracy-level {accuracy_level}: choose 0 to 4")
            options["accuracy_level"] = str(accuracy_level)
    elif accuracy_level is not None:
        raise BadInputError("--accuracy-level applies to int4/int8 MatMulNBits, not fp32")
    if qdq:
        options["use_qdq"] = "true"
        if config.get("tie_word_embeddings"):
            options["shared_embeddings"] = "false"  # QDQ asserts on Gather (module docstring)
    return BuildPlan(precision=precision, ep=ep, qdq=qdq, options=options, codes=codes,
                     quantized_input=bool(qconfig), config_changes=config_changes)


def _staged(folder: Path, changes: dict, into: Path) -> Path:
    """`folder` as the builder should read it: links to its files, config.json's quantization_config changed."""
    staged = into / Path(folder).name
    staged.mkdir()
    for f in Path(folder).iterdir():
        if f.is_file() and f.name != "config.json":
            (staged / f.name).symlink_to(f.resolve())
    config = json.loads((Path(folder) / "config.json").read_text())
    config["quantization_config"] = config["quantization_config"] | changes
    (staged / "config.json").write_text(json.dumps(config, indent=2))
    return staged


def _error_line(log: str) -> str:
    """The line of the builder's output that says what went wrong (its last exception line)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:300]


def run_builder(folder: Path, out: Path, plan: BuildPlan, log_path: Path) -> None:
    """Run the builder into `out` (a fresh folder), its output in `log_path`; BadInputError with its error line."""
    require_packages()
    cache = Path(tempfile.mkdtemp(prefix="qwenquant-onnx-cache-"))
    if plan.config_changes:
        folder = _staged(folder, plan.config_changes, cache)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(folder).resolve()),
           "-o", str(out), "-p", plan.precision, "-e", plan.ep, "-c", str(cache)]
    if plan.options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in plan.options.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    try:
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        kept = Path(tempfile.mkstemp(prefix="qwenquant-onnx-builder-", suffix=".log")[1])
        shutil.copyfile(log_path, kept)
        raise BadInputError(f"onnxruntime-genai's model builder failed: {_error_line(log_path.read_text())} "
                            f"(its full output: {kept})")


def builder_versions() -> dict:
    """Versions of the packages the builder and the verification use (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in REQUIRED.values():
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def genai_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "genai_config.json").read_text())
