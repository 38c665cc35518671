"""The estimate for people: where the sizes come from (before download), rich tables of sizes, memory (with the
peak phase's parts), disk, time per stage, the dominant stage, the streaming line, and the verdict."""

from __future__ import annotations

from qwenquant.estimate.facts import HUB_HEADERS_NOTE, NO_WEIGHTS_NOTE
from qwenquant.estimate.result import Estimate, gib

FIT_MARK = {True: "[green]fits[/green]", False: "[red]does not fit[/red]", None: ""}
SIZES_NOTES = {"config.json": NO_WEIGHTS_NOTE, "hub safetensors headers": HUB_HEADERS_NOTE}


def secs(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _resources_table(est: Estimate):
    from rich.table import Table

    m, s, d = est.memory, est.sizes, est.disk
    table = Table(title="resources (estimated before loading any weight)", show_lines=False)
    table.add_column("what")
    table.add_column("estimate", justify="right")
    table.add_column("available / detail")
    table.add_row("output safetensors", gib(s["output_bytes"]),
                  f"{s['quantized_linears']} quantized Linears, {s['kept_linears']} kept; x{s['ratio']:.3f} of the source")
    reclaim = (f"; {gib(m['reclaimable_at_peak_bytes'])} of it clean mapped weights the kernel can drop"
               if m["reclaimable_at_peak_bytes"] else "")
    table.add_row("peak host memory (RSS)", gib(m["peak_host_bytes"]),
                  f"{gib(m['available_host_bytes'])} {m['available_host_source']} {FIT_MARK[est.fits['host']]}; "
                  f"during {m['peak_host_phase']}{reclaim}")
    for part, nbytes in sorted(m["peak_host_breakdown"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"  {part}", gib(nbytes), "")
    if m["peak_device_bytes"] is not None:
        table.add_row("peak device memory", gib(m["peak_device_bytes"]),
                      f"{gib(m['available_device_bytes'])} free {FIT_MARK[est.fits['device']]}; "
                      f"during {m['peak_device_phase']}")
    else:
        table.add_row("peak device memory", "-", "computing on the CPU: device memory is host memory")
    table.add_row("disk", gib(d["need_bytes"]), f"{gib(d['free_bytes'])} free at {d['path']} {FIT_MARK[est.fits['disk']]}")
    if d["offload_path"] is not None:
        where = ("on the output's disk (in the disk row)" if d["offload_same_disk"]
                 else f"{gib(d['offload_free_bytes'])} free at {d['offload_path']}")
        table.add_row("--offload-dir layer files", gib(d["offload_bytes"]), where)
    return table


def _times_table(est: Estimate):
    from rich.table import Table

    t = est.timings_s
    times = Table(title=f"time (calibrated by a {est.probe['seconds']:.1f} s probe, {est.probe['threads']} threads)")
    times.add_column("stage")
    times.add_column("estimate", justify="right")
    for k, v in t.items():
        if k == "stages":
            for sk, sv in v.items():
                times.add_row(f"  quantize: {sk}", secs(sv))
        elif k != "total":
            times.add_row(k, secs(v))
    times.add_row("[bold]total[/bold]", f"[bold]{secs(t['total'])}[/bold]")
    return times


def print_estimate(est: Estimate, console=None) -> None:
    """Rich tables for people: sizes, memory (with the peak phase's parts), disk, time per stage, verdict."""
    from rich.console import Console

    console = console or Console()
    console.print(f"[bold]qwenquant --dry-run[/bold]: {est.model['reference']} ({est.model['architecture']}, "
                  f"{est.model['num_layers']} layers, {est.model['parameters'] / 1e9:.3f}B parameters, "
                  f"{est.model['dtype']}) -> {est.recipe['scheme']}, {est.recipe['format']}, on {est.recipe['device']}")
    if est.model["sizes_from"] in SIZES_NOTES:  # before download: say so before any number
        console.print(f"[bold]{SIZES_NOTES[est.model['sizes_from']]}[/bold]", highlight=False)
    console.print(_resources_table(est))
    console.print(_times_table(est))
    dom = est.dominant_stage
    console.print(f"dominant: {dom['label']} {100 * dom['share']:.0f}% ({secs(dom['seconds'])})", highlight=False)
    if est.streaming is not None:
        st = est.streaming
        console.print(f"data-free streaming: time ~ reading source + writing output at disk speed "
                      f"({gib(st['read_bytes'])} read + {gib(st['write_bytes'])} written, about "
                      f"{secs(st['seconds'])})", highlight=False)
    if est.ranks is not None:
        r = est.ranks
        console.print(f"{r['world_size']} ranks ({r['ranks_on_this_machine']} on this machine): "
                      f"{gib(r['peak_host_bytes_per_rank'])} peak host memory per rank, "
                      f"{gib(r['peak_host_bytes_this_machine'])} on this machine; total {secs(est.timings_s['total'])} "
                      f"vs {secs(r['total_s_one_process'])} in one process (x{r['expected_speedup']:.2f})",
                      highlight=False)
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)
    if est.ok:
        console.print("[green]fits[/green]: run the same command without --dry-run")
    else:
        for r in est.reasons:
            console.print(f"[red]does not fit[/red]: {r}", highlight=False)
