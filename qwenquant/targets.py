"""Deployment targets as data: which GPUs exist, what each can run fast, and the recipe chosen for each.

A checkpoint's *serving scheme* (`fp8-w8a8`, `int8-w8a8`, `w4a16`, `nvfp4`, ...; each quantizer stage names its own
in `StageSpec.serving_scheme`) needs kernels an engine (vLLM) has only from some compute capability on:

| scheme | runs from | kernel path in vLLM |
|---|---|---|
| fp8-w8a8 | sm89 | FP8 tensor cores (CUTLASS scaled_mm) |
| fp8-w8a16, w4a16, w8a16, nvfp4a16 | sm80 | Marlin mixed-precision GEMM (weights dequantized in registers) |
| w4a16, w8a16, w3a16 (GPTQ/AWQ formats) | sm75 | GPTQ exllama / AWQ GEMM kernels, slower than Marlin (the t4 recipe writes `--format gptq`) |
| int8-w8a8 | sm75 | INT8 tensor cores (CUTLASS scaled_mm with per-token / per-channel scales) |
| nvfp4 (W4A4) | sm100 | FP4 tensor cores (Blackwell: B200 sm100, RTX 50xx sm120) |

`cpu` means a CPU runtime: llama.cpp for GGUF (the recipe: GPTQ codes as Q4_0) or vLLM's CPU backend (x86 with
AVX-512), which runs INT8 W8A8 and the INT4 weight-only formats.
Each target's recipe is the scheme that GPU runs fastest at the least accuracy cost (`TARGETS[...].why` says why);
the recipes ship in `qwenquant/data/targets/<key>.yaml` (also reachable as `recipes/targets/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class GpuSpec:
    """Published figures of a device (vendor spec sheets: memory bandwidth in 1e9 bytes/s, memory in GiB; the
    compute capability as "major.minor", "cpu" for the CPU backend)."""

    key: str
    name: str
    compute_capability: str
    memory_gib: float
    bandwidth_gb_s: float

    @property
    def sm(self) -> int | None:
        """Compute capability as an integer (8.9 -> 89); None for the CPU."""
        if self.compute_capability == "cpu":
            return None
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


@dataclass(frozen=True)
class Target:
    gpu: GpuSpec
    recipe: str  # the shipped recipe's scheme, for the message
    why: str


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("h100", "H100 SXM 80GB", "9.0", 80.0, 3350.0),
    GpuSpec("l40s", "L40S", "8.9", 48.0, 864.0),
    GpuSpec("rtx4090", "RTX 4090", "8.9", 24.0, 1008.0),      # 384-bit GDDR6X at 21 Gbps
    GpuSpec("a100", "A100 SXM 80GB", "8.0", 80.0, 2039.0),
    GpuSpec("rtx3090", "RTX 3090", "8.6", 24.0, 936.0),       # 384-bit GDDR6X at 19.5 Gbps
    GpuSpec("a10g", "A10G", "8.6", 24.0, 600.0),              # AWS G5 instances
    GpuSpec("rtx3060", "RTX 3060 12GB", "8.6", 12.0, 360.0),  # 192-bit GDDR6 at 15 Gbps
    GpuSpec("t4", "T4", "7.5", 16.0, 320.0),
    GpuSpec("rtx5090", "RTX 5090", "12.0", 32.0, 1792.0),
    GpuSpec("b200", "B200", "10.0", 180.0, 8000.0),
    GpuSpec("cpu", "CPU (llama.cpp, or vLLM's CPU backend)", "cpu", 0.0, 0.0),
)
GPU_BY_KEY = {g.key: g for g in GPUS}

# Consumer and small data-centre GPUs whose decode speed and max context `qwenquant bench` projects.
PROJECTED = ("rtx4090", "rtx3090", "a10g", "rtx3060", "rtx5090", "t4")

# scheme -> (lowest compute capability that runs it, how); "cpu" in `CPU_SCHEMES`.
SCHEME_NEEDS: dict[str, tuple[int, str]] = {
    "fp8-w8a8": (89, "FP8 tensor cores (Ada/Hopper and newer)"),
    "fp8-w8a16": (80, "FP8 weight-only through Marlin (Ampere and newer)"),
    "int8-w8a8": (75, "INT8 tensor cores (Turing and newer)"),
    "w4a16": (75, "INT4 weight-only (Marlin from Ampere, GPTQ/AWQ kernels on Turing)"),
    "w8a16": (75, "INT8 weight-only (Marlin from Ampere, GPTQ kernels on Turing)"),
    "w3a16": (75, "INT3 weight-only (GPTQ kernels)"),
    "w2a16": (75, "INT2 weight-only (GPTQ kernels)"),
    "nvfp4a16": (80, "FP4 weight-only through Marlin (Ampere and newer)"),
    "nvfp4": (100, "FP4 tensor cores (Blackwell: sm100, sm120)"),
}
CPU_SCHEMES = ("int8-w8a8", "w4a16")

TARGETS: dict[str, Target] = {
    "h100": Target(GPU_BY_KEY["h100"], "FP8 dynamic", "FP8 tensor cores: W8A8 doubles the matmul rate of bf16 and "
                   "halves the weight bytes; per-channel weights + per-token activations cost almost no accuracy"),
    "l40s": Target(GPU_BY_KEY["l40s"], "FP8 dynamic", "Ada has FP8 tensor cores: same choice as H100"),
    "rtx4090": Target(GPU_BY_KEY["rtx4090"], "FP8 dynamic", "Ada has FP8 tensor cores: W8A8 FP8, near-lossless"),
    "a100": Target(GPU_BY_KEY["a100"], "INT8 W8A8 (smoothed)", "no FP8 compute on Ampere; INT8 tensor cores run "
                   "W8A8 at twice the bf16 rate for batched serving, and smoothing keeps INT8 activations accurate"),
    "rtx3090": Target(GPU_BY_KEY["rtx3090"], "W4A16 GPTQ", "no FP8 compute; a 24 GB card serves few sequences, so "
                      "decode is memory-bound and 4-bit weights (Marlin) read 4x fewer bytes than bf16"),
    "a10g": Target(GPU_BY_KEY["a10g"], "W4A16 GPTQ", "no FP8 compute; 600 GB/s makes decode memory-bound: 4-bit "
                   "weights"),
    "rtx3060": Target(GPU_BY_KEY["rtx3060"], "W4A16 GPTQ", "12 GB and 360 GB/s: 4-bit weights fit and decode "
                      "fastest"),
    "t4": Target(GPU_BY_KEY["t4"], "W4A16 GPTQ", "Turing: no FP8, no Marlin; 16 GB at 320 GB/s is memory-bound, "
                 "so 4-bit weights (GPTQ kernels) decode fastest"),
    "rtx5090": Target(GPU_BY_KEY["rtx5090"], "NVFP4 W4A4", "Blackwell FP4 tensor cores: 4-bit weights and "
                      "activations, twice the FP8 matmul rate"),
    "b200": Target(GPU_BY_KEY["b200"], "NVFP4 W4A4", "Blackwell FP4 tensor cores: twice the FP8 matmul rate"),
    "cpu": Target(GPU_BY_KEY["cpu"], "GGUF Q4_0 from GPTQ g32", "CPU users run llama.cpp (Ollama, LM Studio): GPTQ's "
                  "4-bit codes in 32-element groups are stored exactly as Q4_0 blocks, which its CPU kernels run "
                  "everywhere"),
}
TARGET_NAMES = tuple(TARGETS) + ("auto",)


def target_runs(target: str, scheme: str) -> str | None:
    """None when `target` runs `scheme`, else why not (one sentence naming both)."""
    gpu = GPU_BY_KEY[target]
    if gpu.sm is None:
        if scheme in CPU_SCHEMES:
            return None
        return f"{scheme} does not run on CPU runtimes (they run {', '.join(CPU_SCHEMES)})"
    need, how = SCHEME_NEEDS[scheme]
    if gpu.sm >= need:
        return None
    return (f"{scheme} needs {how}, compute capability {need // 10}.{need % 10}+; {gpu.name} is "
            f"{gpu.compute_capability}")


def detect_target(capability: tuple[int, int] | None) -> str:
    """The target for a device of CUDA compute capability `capability` ((major, minor), None: no GPU -> "cpu"): the
    listed GPU of the same capability with the most memory, else the newest listed one below it."""
    if capability is None:
        return "cpu"
    sm = capability[0] * 10 + capability[1]
    gpus = [g for g in GPUS if g.sm is not None and g.key in TARGETS]
    same = [g for g in gpus if g.sm == sm]
    if same:
        return max(same, key=lambda g: g.memory_gib).key
    below = [g for g in gpus if g.sm < sm]
    if not below:
        return min(gpus, key=lambda g: g.sm).key
    return max(below, key=lambda g: (g.sm, g.memory_gib)).key


def resolve_target(name: str) -> str:
    """A target key from a `--target` value: "auto" reads this machine's first CUDA device."""
    if name != "auto":
        return name
    import torch

    return detect_target(torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)


def target_recipe(target: str) -> Path:
    """The shipped recipe file of `target`."""
    return Path(str(resources.files("qwenquant") / "data" / "targets" / f"{target}.yaml"))
