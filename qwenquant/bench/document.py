"""The bench result document (schema in `bench.output`): run metadata, kernels, memory, the grid's points, the
memory-budget context, the FP8 KV saving and the consumer-GPU projections, all assembled from measured inputs."""

from __future__ import annotations

import platform
from dataclasses import asdict

import torch

from qwenquant.bench import bandwidth as bw
from qwenquant.bench.capacity import capacity_section
from qwenquant.bench.memory import decode_read_bytes, max_context
from qwenquant.bench.output import KIND, SCHEMA_VERSION
from qwenquant.bench.timing import PREFILL_CHUNK, warmup_steps
from qwenquant.kernels.kv_cache import kv_bytes_per_token
from qwenquant.reporting import environment_versions, report_header

CPU_NOTE = "CPU numbers are not GPU numbers: they exercise the code paths only and predict nothing about a GPU."


def device_info(device: torch.device) -> dict:
    """What the numbers were measured on (GPU name and capability, or the CPU and its torch threads)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": "%d.%d" % (props.major, props.minor),
                "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _kv_saving(config, contexts: list[int], max_positions: int | None) -> dict:
    """KV bytes bf16 vs fp8 at the longest benchmarked context and at the model's max positions (computed)."""
    bf16, fp8 = kv_bytes_per_token(config, "bf16"), kv_bytes_per_token(config, "fp8")
    out = {"per_token_bf16_bytes": bf16, "per_token_fp8_bytes": fp8, "at": []}
    for ctx in sorted({max(contexts), *([max_positions] if max_positions else [])}):
        out["at"].append({"context": ctx, "batch": 1, "bf16_bytes": bf16 * ctx, "fp8_bytes": fp8 * ctx,
                          "saved_bytes": (bf16 - fp8) * ctx})
    return out


def build_document(loaded, settings, device: torch.device, points: list[dict], bandwidth: dict,
                   weights: tuple[int, int, str], load_s: float, command: str, started: float) -> dict:
    """Everything `qwenquant_bench.json` holds; `weights` = (exact tensor bytes, measured at load, measured kind)."""
    weight_exact, weights_measured, measured_kind = weights
    config = loaded.model.config.get_text_config()
    max_positions = getattr(config, "max_position_embeddings", None)
    kv_per_token = kv_bytes_per_token(config, settings.kv_cache)
    ok = [p for p in points if p["status"] == "ok"]
    workspace = max((p["memory"].get("workspace_bytes") or 0 for p in ok), default=0)
    budget = None
    if settings.memory_budget_gib is not None:
        budget_bytes = int(settings.memory_budget_gib * 2**30)
        budget = {"budget_gib": settings.memory_budget_gib, "weights_bytes": weight_exact,
                  "reserve_bytes": workspace, "kv_bytes_per_token": kv_per_token,
                  "formula": "floor((budget - weights - reserve) / (kv_bytes_per_token * batch)), capped at "
                             "max_position_embeddings; reserve = the largest measured workspace (0 on CPU, where "
                             "workspace is not measured)",
                  "computed": True,
                  "max_context": {str(b): max_context(budget_bytes, weight_exact, workspace, kv_per_token, b,
                                                      max_positions) for b in settings.batch_sizes}}
    efficiency = None
    b1 = [p for p in ok if p["batch"] == 1]
    if device.type == "cuda" and b1 and b1[0].get("fraction_of_bound"):
        efficiency = b1[0]["fraction_of_bound"]
    ctx = min(settings.contexts)
    return report_header(SCHEMA_VERSION, kind=KIND, command=command, started=started) | {
        "environment": environment_versions(),
        "device": device_info(device),
        "cpu_note": CPU_NOTE if device.type == "cpu" else None,
        "model": {"path": str(loaded.folder), "architecture": (loaded.model.config.architectures or [None])[0],
                  "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "max_position_embeddings": max_positions, "format": loaded.format,
                  "quant_method": (loaded.quant_config or {}).get("quant_method"),
                  "quant_format": (loaded.quant_config or {}).get("format"), "activations": loaded.activations,
                  "scheme": scheme_name(loaded)},
        "settings": {**asdict(settings), "device": str(device), "prefill_chunk": PREFILL_CHUNK,
                     "warmup_steps": warmup_steps(device, settings.compile),
                     "compile_effective": settings.compile and device.type == "cuda"},
        "kernels": loaded.kernels(),
        "notes": loaded.notes + _kv_notes(loaded, settings),
        "load_s": load_s,
        "weights": {"tensor_bytes": weight_exact, "measured_bytes": weights_measured, "measured_kind": measured_kind,
                    "measured_note": "CUDA: allocated bytes after the load minus before" if device.type == "cuda" else
                    "host RSS after the load minus before: includes library code and buffers loaded on first use",
                    "decode_read_bytes_batch1": decode_read_bytes(loaded.model, 1)},
        "kv_cache": {"dtype": settings.kv_cache, "bytes_per_token": kv_per_token, "scales": _kv_scales(loaded, settings)},
        "bandwidth": bandwidth,
        "points": points,
        "max_context": budget,
        "kv_saving": _kv_saving(config, settings.contexts, max_positions) if settings.kv_cache == "fp8" else None,
        "capacity": _capacity(loaded, config, settings, device, ok, weight_exact, workspace),
        "projections": {"label": bw.PROJECTION_LABEL, "context": ctx,
                        "basis": "batch-1 decode bound = published bandwidth / (decode weight bytes + KV bytes of the "
                                 "context), from this run's measured bytes" +
                                 ("; expected = bound x this GPU's measured fraction of its bound" if efficiency else
                                  "; no expected figure: this run did not measure on a GPU"),
                        "gpus": bw.project_gpus(weight_exact, decode_read_bytes(loaded.model, 1), kv_per_token, ctx,
                                                max_positions, efficiency, serving_scheme(scheme_name(loaded)))},
    }


def _capacity(loaded, config, settings, device: torch.device, ok: list[dict], weight_exact: int,
              workspace: int) -> dict | None:
    """Memory vs context and sequences per GPU (bench/capacity.py), bf16 vs FP8 cache: the benched dtype's bytes
    per token as measured (cache tensor bytes / (max_cache_len x batch) of a point), the other computed."""
    cfg = config.to_dict()
    if not cfg.get("max_position_embeddings"):
        return None
    per_token = {k: kv_bytes_per_token(config, k) for k in ("bf16", "fp8")}
    sources = {k: "computed: 2 x layers x kv_heads x head_dim x element bytes" for k in per_token}
    if ok:
        p = ok[0]
        per_token[settings.kv_cache] = p["memory"]["kv_cache_bytes"] // (p["max_cache_len"] * p["batch"])
        sources[settings.kv_cache] = f"measured: cache tensor bytes of the {p['batch']}x{p['context']} point"
    dtype_bytes = next(loaded.model.parameters()).element_size() if loaded.format == "bf16" else 2
    measured_gpu = device_info(device)["name"] if device.type == "cuda" else None
    return capacity_section(cfg, weight_exact, per_token, sources, PREFILL_CHUNK, dtype_bytes,
                            workspace if device.type == "cuda" else None, measured_gpu)


def scheme_name(loaded) -> str:
    """A short scheme name: bf16, fp8-w8a8-dynamic, fp8-w8a8-static, fp8-weight-only, fp8-block, int8-w8a8, w4a16,
    ..."""
    if loaded.format == "bf16":
        return "bf16"
    qc = loaded.quant_config or {}
    if qc.get("format") == "int-quantized":  # compressed-tensors INT8 W8A8
        return "int8-w8a8"
    fp8 = loaded.format == "hf-fp8" or qc.get("format") == "float-quantized"
    if fp8:
        acts = loaded.activations
        if loaded.format == "hf-fp8" or acts == "group":
            return "fp8-block"
        return {"token": "fp8-w8a8-dynamic", "tensor": "fp8-w8a8-static"}.get(acts, "fp8-weight-only")
    if qc.get("format") == "nvfp4-pack-quantized":
        return "nvfp4" if loaded.activations else "nvfp4a16"
    bits = qc.get("bits") or next((g["weights"]["num_bits"] for g in (qc.get("config_groups") or {}).values()
                                   if isinstance(g, dict) and g.get("weights")), None)
    return f"w{bits}a16-{loaded.format}"


def serving_scheme(scheme: str) -> str | None:
    """The engine scheme (`qwenquant.targets.SCHEME_NEEDS` key) of a `scheme_name`; None for bf16."""
    if scheme == "bf16":
        return None
    from qwenquant.targets import SCHEME_NEEDS

    if scheme in SCHEME_NEEDS:  # int8-w8a8, nvfp4, nvfp4a16
        return scheme
    if scheme.startswith("fp8-"):
        return "fp8-w8a16" if scheme == "fp8-weight-only" else "fp8-w8a8"
    return scheme.split("-")[0]  # w4a16-gptq -> w4a16


def _kv_scales(loaded, settings) -> str | None:
    if settings.kv_cache == "bf16":
        return None
    if not loaded.kv_scales:
        return "prefill absmax / 448 per layer"
    strategy = ((loaded.quant_config or {}).get("kv_cache_scheme") or {}).get("strategy", "tensor")
    per = "per KV head" if strategy == "attn_head" else "per layer"
    return f"calibrated {per} (checkpoint kv_cache_scheme, strategy {strategy})"


def _kv_notes(loaded, settings) -> list[str]:
    if settings.kv_cache != "fp8":
        return []
    return ["FP8 KV cache: K/V stored in float8_e4m3fn with scales for K and for V (see kv_cache.scales); attention "
            "computes in bf16 after upcasting one layer's cache at a time (no fused FP8 attention kernel)"]
