#!/usr/bin/env python
"""llm-compressor baseline (GPTQ / AWQ) on exactly the calibration tokens qwenquant used.

Run with the isolated venv created by ``benchmarks/setup_llmcompressor.sh``::

    benchmarks/.venv-llmcompressor/bin/python benchmarks/llmcompressor_baseline.py \
        --model /path/to/qwen3 --calib-ids calib_ids.pt --scheme gptq --bits 4 \
        --group-size 128 --out out/llmc-gptq-w4g128 --json out/llmc-gptq-w4g128.json

``--calib-ids`` is a ``torch.save``-d LongTensor ``[num_samples, seq_len]`` (e.g. from
``qwenquant.calibration.load_calibration``). It is turned into a ``datasets.Dataset`` with
``input_ids`` + all-ones ``attention_mask``; llm-compressor sees a pre-tokenized dataset and
does not re-tokenize, shuffle (``shuffle_calibration_samples=False``) or truncate
(``max_seq_length=seq_len``), so both tools are calibrated on identical tokens.

Recipes (llm-compressor 0.14 API):

* gptq: ``GPTQModifier(config_groups={group_0: Linear, int, symmetric, group strategy,
  group_size, num_bits}, ignore=["lm_head"], actorder="static", dampening_frac=0.01)``;
  at 4 bits / g128 this is exactly the ``W4A16`` preset.
* awq:  ``[AWQModifier(duo_scaling=True), QuantizationModifier(config_groups={...
  asymmetric ...}, ignore=["lm_head"])]`` -- the non-deprecated spelling of the
  ``AWQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])`` used in
  llm-compressor's examples/awq/llama_example.py. Qwen3ForCausalLM uses llm-compressor's
  ``default_mappings`` (input_layernorm->qkv, v_proj->o_proj, post_attention_layernorm->
  gate/up, up->down). With GQA (num_key_value_heads < num_attention_heads) v_proj's output
  width differs from o_proj's input width, so llm-compressor skips the v_proj->o_proj
  mapping ("N mappings were skipped due to incompatible shapes"): 3 smoothings per layer.

For bits != 4 (e.g. 3) the same ``config_groups`` are used with ``num_bits=bits``.

CPU notes: both schemes run llm-compressor's sequential pipeline (torch.fx tracing of
Qwen3ForCausalLM works on CPU as is). llm-compressor 0.14.0.1's AWQ pins cached activations
unconditionally (``IntermediatesCache.pin_memory``), which raises "Cannot access accelerator
device when none is available" on CPU-only torch; ``patch_cpu_only()`` makes it a no-op when
no accelerator exists and the JSON lists it under "patches".

Loading the outputs: symmetric (GPTQ) outputs load with plain
``AutoModelForCausalLM.from_pretrained`` under transformers 5.23 / compressed-tensors 0.20.
Asymmetric ones (AWQ default) hit a compressed-tensors meta-init bug there; see
``patch_ct_asym_meta_loading()`` (reader side) or run AWQ with ``--symmetric true``.

The JSON written to ``--json``::

    {"tool": "llm-compressor", "version": "0.14.0.1", "scheme": "gptq", "bits": 4,
     "group_size": 128, "wall_s": 12.3,            # oneshot() only (no load / save)
     "peak_rss_bytes": 123456789,                  # process peak RSS (ru_maxrss)
     "out": "/abs/path/to/out",
     # extra, informational:
     "symmetric": true, "actorder": "static", "dampening_frac": 0.01, "dtype": "bfloat16",
     "num_samples": 32, "seq_len": 512, "calib_sha256": "...",  # == qwenquant samples_hash
     "compressed_tensors_version": "...", "transformers_version": "...",
     "torch_version": "...", "threads": 2, "device": "cpu", "patches": [...],
     "load_s": 0.3, "save_s": 0.4}
   (awq runs carry "duo_scaling"/"n_grid" instead of "actorder"/"dampening_frac"/"block_size")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (or hub id)")
    p.add_argument("--calib-ids", required=True, help="torch.save'd LongTensor [num_samples, seq_len]")
    p.add_argument("--scheme", required=True, choices=("gptq", "awq"))
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128, help="columns per scale group; <= 0: per output channel")
    p.add_argument("--out", required=True, help="directory for the compressed model")
    p.add_argument("--json", required=True, help="result JSON file")
    p.add_argument(
        "--actorder",
        default="static",
        choices=("static", "group", "weight", "none"),
        help="GPTQ activation ordering (default: static, llm-compressor's default). "
        "'group' writes weight_g_idx, which compressed-tensors 0.20 (system) can no longer load",
    )
    p.add_argument("--dampening", type=float, default=0.01, help="GPTQ dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block_size")
    p.add_argument(
        "--symmetric",
        choices=("auto", "true", "false"),
        default="auto",
        help="auto: symmetric for gptq, asymmetric for awq (as in llm-compressor's examples)",
    )
    p.add_argument(
        "--awq-duo-scaling",
        choices=("true", "false", "both"),
        default="true",
        help="AWQModifier.duo_scaling (llm-compressor default: true)",
    )
    p.add_argument("--awq-n-grid", type=int, default=20, help="AWQModifier.n_grid")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32", "auto"),
        help="dtype the model is loaded in (qwenquant's default is bfloat16)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size")
    p.add_argument(
        "--pipeline",
        default=None,
        help="llm-compressor calibration pipeline (default: its own choice, i.e. "
        "'independent' -> sequential per modifier)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device-visible", action="store_true", help="do not hide CUDA devices")
    return p.parse_args(argv)


def load_calib_ids(path: str) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):  # tolerate {"input_ids": tensor} / {"ids": tensor}
        for key in ("input_ids", "ids", "samples"):
            if key in obj:
                obj = obj[key]
                break
    if not isinstance(obj, torch.Tensor):
        raise SystemExit(f"--calib-ids {path}: expected a tensor, got {type(obj).__name__}")
    if obj.dim() != 2 or obj.dtype.is_floating_point:
        raise SystemExit(f"--calib-ids {path}: expected integer tensor [num_samples, seq_len], got {tuple(obj.shape)} {obj.dtype}")
    return obj.to(torch.long).contiguous()


def calib_sha256(ids: torch.Tensor) -> str:
    # same definition as qwenquant.calibration.samples_hash
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def build_dataset(ids: torch.Tensor):
    from datasets import Dataset

    rows = ids.tolist()
    return Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
    )


def weight_args(args: argparse.Namespace, symmetric: bool) -> dict:
    grouped = args.group_size is not None and args.group_size > 0
    return {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if grouped else "channel",
        "group_size": args.group_size if grouped else None,
        "dynamic": False,
    }


def build_recipe(args: argparse.Namespace):
    if args.symmetric == "auto":
        symmetric = args.scheme == "gptq"
    else:
        symmetric = args.symmetric == "true"
    config_groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": weight_args(args, symmetric),
            "input_activations": None,
            "output_activations": None,
        }
    }
    ignore = ["lm_head"]

    if args.scheme == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        actorder = None if args.actorder == "none" else args.actorder
        recipe = GPTQModifier(
            config_groups=config_groups,
            ignore=ignore,
            actorder=actorder,
            dampening_frac=args.dampening,
            block_size=args.block_size,
        )
        info = {"actorder": args.actorder, "dampening_frac": args.dampening, "block_size": args.block_size}
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        duo = {"true": True, "false": False, "both": "both"}[args.awq_duo_scaling]
        recipe = [
            AWQModifier(duo_scaling=duo, n_grid=args.awq_n_grid),
            QuantizationModifier(config_groups=config_groups, ignore=ignore),
        ]
        info = {"duo_scaling": duo, "n_grid": args.awq_n_grid}
    info["symmetric"] = symmetric
    return recipe, info


def copy_tokenizer_files(src: str, dst: Path) -> None:
    src_p = Path(src)
    if not src_p.is_dir():
        return
    for name in TOKENIZER_FILES:
        f = src_p / name
        if f.is_file() and not (dst / name).exists():
            shutil.copy2(f, dst / name)


def patch_cpu_only() -> list[str]:
    """Work around llm-compressor 0.14.0.1 assuming an accelerator exists.

    ``AWQModifier._apply_smoothing`` unconditionally calls
    ``IntermediatesCache.pin_memory`` on the cached parent-module inputs (only an
    H2D-transfer optimisation); on a CPU-only torch ``Tensor.pin_memory()`` raises
    "RuntimeError: Cannot access accelerator device when none is available."
    Pinning is pointless without an accelerator, so make it a no-op there.
    """
    patches = []
    if torch.accelerator.is_available():
        return patches
    from llmcompressor.pipelines.cache import IntermediatesCache

    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        patches.append("IntermediatesCache.pin_memory->noop (no accelerator)")
    return patches


def peak_rss_bytes() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru) if sys.platform == "darwin" else int(ru) * 1024  # Linux: KiB


def patch_ct_asym_meta_loading() -> bool:
    """READER-side fix, for the *system* python that loads our outputs (not used by main()).

    compressed-tensors (0.19 and 0.20) builds the meta-device placeholder of an asymmetric
    pack-quantized Linear with an UNPACKED ``weight_zero_point`` [N, G]
    (``PackedQuantizationCompressor.compress``'s meta branch returns early, before the
    zero point is packed), while every checkpoint stores it packed [ceil(N*bits/32), G].
    transformers 5.23 initialises on meta and then raises on the size mismatch, so
    ``AutoModelForCausalLM.from_pretrained`` fails for ANY asymmetric pack-quantized
    checkpoint (llm-compressor AWQ W4A16_ASYM, qwenquant ``--asym`` alike). Call this
    once before ``from_pretrained``::

        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("llmcb", "benchmarks/llmcompressor_baseline.py")
        llmcb = importlib.util.module_from_spec(spec); spec.loader.exec_module(llmcb)
        llmcb.patch_ct_asym_meta_loading()

    Returns True if the patch was applied. Idempotent; no-op where it isn't needed.
    """
    import math

    from compressed_tensors.compressors.pack_quantized import base as pq

    cls = pq.PackedQuantizationCompressor
    if getattr(cls, "_asym_meta_zp_patched", False):
        return True
    orig = cls.compress.__func__

    def compress(klass, state_dict, scheme):
        zp = state_dict.get("weight_zero_point")
        out = orig(klass, state_dict, scheme)
        w = scheme.weights
        if (
            zp is not None
            and zp.device.type == "meta"
            and out.get("weight_zero_point") is not None
            and out["weight_zero_point"].shape == zp.shape  # still unpacked
            and not w.symmetric
            and w.strategy in pq.PACK_ZP_STRATS
        ):
            rows = math.ceil(zp.shape[0] * w.num_bits / 32)
            out["weight_zero_point"] = torch.empty(
                (rows, *zp.shape[1:]), dtype=torch.int32, device="meta"
            )
        return out

    cls.compress = classmethod(compress)
    cls._asym_meta_zp_patched = True
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    # Keep the run on CPU even if a GPU were visible: the baseline must be comparable
    # with qwenquant's CPU runs (--device-visible opts out). Set before llmcompressor /
    # compressed-tensors are imported (CUDA is initialised lazily).
    if not args.device_visible:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_calib_ids(args.calib_ids)
    num_samples, seq_len = ids.shape
    ds = build_dataset(ids)

    t0 = time.perf_counter()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t0

    recipe, recipe_info = build_recipe(args)
    patches = patch_cpu_only()

    oneshot_kwargs = dict(
        model=model,
        processor=tokenizer,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=num_samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
        save_compressed=True,
    )
    if args.pipeline:
        oneshot_kwargs["pipeline"] = args.pipeline

    t0 = time.perf_counter()
    model = oneshot(**oneshot_kwargs)
    wall_s = time.perf_counter() - t0

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.save_pretrained(str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))
    copy_tokenizer_files(args.model, out)
    save_s = time.perf_counter() - t0

    result = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "scheme": args.scheme,
        "bits": args.bits,
        "group_size": args.group_size,
        "wall_s": round(wall_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "out": str(out),
        **recipe_info,
        "dtype": args.dtype,
        "num_samples": int(num_samples),
        "seq_len": int(seq_len),
        "calib_sha256": calib_sha256(ids),
        "compressed_tensors_version": compressed_tensors.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu" if not torch.accelerator.is_available() else str(torch.accelerator.current_accelerator()),
        "patches": patches,
        "load_s": round(load_s, 3),
        "save_s": round(save_s, 3),
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
