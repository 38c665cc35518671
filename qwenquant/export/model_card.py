"""The output folder's README.md: a Hugging Face model card built only from what the run measured."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

FORMAT_TAGS = {"compressed-tensors": "compressed-tensors", "hf-fp8": "fp8", "gptq": "gptq", "awq": "awq",
               "gguf": "gguf"}


def source_license(model_dir: Path) -> str | None:
    """`license:` from the source model card's YAML front matter, if it has one."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return None
    match = re.match(r"^---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def _scheme_name(recipe: dict) -> str:
    for stage in recipe["stages"]:
        (name, cfg), = stage.items()
        if name == "fp8":
            acts = {"dynamic": "dynamic activations", "static": "static activations", "none": "weight-only"}[cfg["activations"]]
            return f"FP8 E4M3, {cfg['weights']} weight scales, {acts}"
        if name == "nvfp4":
            acts = "FP4 activations (W4A4)" if cfg["activations"] == "dynamic" else "weight-only (NVFP4A16)"
            return f"NVFP4 (FP4 E2M1 weights in groups of 16, {cfg['method'].upper()}), {acts}"
        if name == "int8":
            return f"INT8 W8A8 (per-channel weights, {cfg['method'].upper()}; dynamic per-token activations)"
        if name in ("gptq", "awq", "rtn"):
            group = "per-channel" if cfg["group_size"] == -1 else f"group {cfg['group_size']}"
            return f"INT{cfg['bits']} weight-only ({name.upper()}, {group}, {'symmetric' if cfg['symmetric'] else 'asymmetric'})"
    return "quantized"


def render_model_card(report: dict, license_id: str | None) -> str:
    """Markdown with YAML front matter; every number is copied from `report` with its setup."""
    recipe = report["recipe"]
    fmt = recipe["export"]["format"]
    base = report["model"]["repo_id"] or Path(report["model"]["reference"]).name
    quantizer = next(n for st in recipe["stages"] for n in st if n in ("fp8", "int8", "nvfp4", "gptq", "awq", "rtn"))
    meta = {
        "base_model": base,
        "library_name": "gguf" if fmt == "gguf" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["qwen3", "quantized", "qwenquant", quantizer, FORMAT_TAGS[fmt]],
    }
    if license_id:
        meta["license"] = license_id
    from qwenquant.report import perplexity_setting, runtime_lines, task_table

    ev, v = report["evaluation"], report.get("verification")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(report['model']['reference']).name} — {_scheme_name(recipe)}", "",
             f"Quantized from `{base}` with qwenquant {report['qwenquant_version']} on {report['created']}, "
             f"stored as `{fmt}`.", "", "## Measured results", ""]
    kept = (report.get("mixed_precision") or {}).get("kept_groups")
    if kept:  # mixed precision: say so before any number
        lines[-2:-2] = [f"Mixed precision: {len(kept)} fused group(s) kept in the source dtype (listed in the "
                        f"quantization config's ignore list): {', '.join(f'`{g}`' for g in kept)}.", ""]
    if "source" in ev:
        lines += [
            f"Measured by qwenquant on `{report['memory']['device']}`: perplexity on {perplexity_setting(ev)}.", "",
            "| model | perplexity |", "|---|---|",
            f"| source | {ev['source']['perplexity']:.4f} |",
            f"| this checkpoint | {ev['quantized']['perplexity']:.4f} ({ev['delta_ppl_pct']:+.2f}%) |", "",
        ]
    kl = ev["kl_vs_source"]
    if kl:
        lines.append(f"Mean next-token KL divergence from the source over {kl['tokens']} held-out tokens: "
                     f"{kl['mean_kl']:.5f} nats (top-1 agreement {100 * kl['top1_agreement']:.2f}%).")
    else:
        lines.append("Next-token KL divergence from the source was not measured for this checkpoint.")
    if v is not None:
        lines.append(f"Verification: reloaded with {v['loader']}, "
                     f"{'passed' if v['passed'] else 'FAILED: ' + v['reason']}.")
        lines += runtime_lines(v.get("runtime"))
    s = report["sizes"]
    lines += ["", f"Weights on disk: {s['output_bytes'] / 2**20:.1f} MiB (source {s['source_bytes'] / 2**20:.1f} MiB).",
              ""]
    if ev.get("tasks"):
        lines += task_table(ev["tasks"])
        lines += ["No throughput numbers are listed because this run did not measure them.", ""]
    else:
        lines += ["No throughput or task-accuracy numbers are listed because this run did not measure them.", ""]
    if fmt == "gguf":
        lines += _gguf_usage(report)
        return "\n".join(lines)
    lines += ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("<this repo>")',
              'tokenizer = AutoTokenizer.from_pretrained("<this repo>")', "```"]
    if fmt in ("gptq", "awq"):
        lines.append("(transformers needs `gptqmodel` installed for this format.)")
    lines += ["", "```bash", 'vllm serve "<this repo>"', "```", "",
              "## How it was made", "", "```bash", report["command"] or "qwenquant run recipe.yaml", "```", "",
              "The full recipe is in `recipe.yaml`; `qwenquant run recipe.yaml` reproduces the run. "
              "`qwenquant_report.json` has every measurement, per-layer errors and provenance (source file hashes, "
              "calibration token hash, library versions).", ""]
    return "\n".join(lines)


def _gguf_usage(report: dict) -> list[str]:
    return ["## How to load", "", "`model.gguf` holds the weights, the hyper-parameters, the tokenizer and the chat "
            "template:", "", "```bash", "llama-cli -m model.gguf -cnv", "```", "",
            "## How it was made", "", "```bash", report["command"] or "qwenquant run recipe.yaml", "```", "",
            "The full recipe is in `recipe.yaml`; `qwenquant_report.json` has every measurement and provenance.", ""]
