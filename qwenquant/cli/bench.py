"""`qwenquant bench MODEL_DIR`: prefill/decode tokens/s, memory split, bandwidth bound and consumer-GPU projections of a
checkpoint folder, with its quantized Linears on real low-precision kernels (`qwenquant.kernels`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.bench.output import summary, write_bench
from qwenquant.cli import app
from qwenquant.cli import common as c
from qwenquant.device import resolve_device
from qwenquant.errors import BadInputError
from qwenquant.eval.checkpoint import check_checkpoint_dir
from qwenquant.progress import Reporter
from qwenquant.reporting import command_line


def parse_ints(value: str, flag: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (one-line error for anything else)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise BadInputError(f"{flag} {value!r}: use comma-separated positive integers like 1,8,32") from None
    if not values or min(values) < 1:
        raise BadInputError(f"{flag} {value!r}: use comma-separated positive integers like 1,8,32")
    return values


@app.command("bench")
def bench_command(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="A checkpoint folder: bf16 source, or a qwenquant / compressed-tensors / hf-fp8 / GPTQ / AWQ output.")],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8,32",
    context: Annotated[str, typer.Option("--context", help="Comma-separated prompt lengths in tokens.")] = "1024,8192,32768",
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Timed decode steps per point.")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    kv_cache: Annotated[str, typer.Option("--kv-cache", help="bf16 | fp8 (K/V stored in float8_e4m3, per-layer scales).")] = "bf16",
    memory_budget: Annotated[Optional[float], typer.Option("--memory-budget", metavar="GiB", help="Also compute the largest context that fits this much memory.")] = None,
    compile_decode: Annotated[bool, typer.Option("--compile/--no-compile", help="CUDA: decode under torch.compile(mode='reduce-overhead') (CUDA graphs).")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results folder (default: MODEL_DIR/bench).")] = None,
    quiet: c.Quiet = False,
    json_out: c.Json = False,
) -> None:
    """Measure speed and memory of a checkpoint with real FP8 / INT4 kernels; write qwenquant_bench.json, BENCH.md, plots."""
    from qwenquant.bench.runner import BenchSettings, run_bench  # heavy (kernels import transformers): on use only

    check_checkpoint_dir(model_dir, "MODEL_DIR")
    settings = BenchSettings(batch_sizes=parse_ints(batch_sizes, "--batch-sizes"), contexts=parse_ints(context, "--context"),
                             decode_tokens=decode_tokens, kv_cache=kv_cache, compile=compile_decode,
                             memory_budget_gib=memory_budget)
    dev = resolve_device(device)
    out = out or model_dir / "bench"
    reporter = Reporter(quiet=quiet or json_out)
    c.silence_libraries()
    if dev.type == "cpu":
        reporter.log("bench on CPU: CPU numbers are not GPU numbers (no GPU here, or --device cpu)")
    command = command_line((ctx.obj or {}).get("argv", sys.argv[1:]))
    result = run_bench(model_dir, settings, dev, reporter, command)
    write_bench(result, out)
    s = summary(result)
    if json_out:
        print(json.dumps({"ok": True, "out": str(out), **s,
                          "points": [{k: p.get(k) for k in ("batch", "context", "status", "prefill_tokens_per_s",
                                                            "decode_tokens_per_s", "bound_tokens_per_s")}
                                     for p in result["points"]]}))
    elif not quiet:
        for p in result["points"]:
            if p["status"] == "ok":
                reporter.log(f"batch {p['batch']:>3} context {p['context']:>6}: prefill {p['prefill_tokens_per_s']:,.0f} tok/s, "
                             f"decode {p['decode_tokens_per_s']:,.1f} tok/s (bound {p['bound_tokens_per_s']:,.0f})")
            else:
                reporter.log(f"batch {p['batch']:>3} context {p['context']:>6}: {p['status']} ({p['error']})")
        reporter.console.print(f"[green]wrote {out}[/green]: see {out}/BENCH.md")
