"""--dry-run of a distributed run (`--nproc N`, or under torchrun): what N ranks change in the single-process
estimate.

The model of qwenquant/distributed.py: every rank loads the whole model (with --offload-dir: its resident tensors
and one decoder layer at a time) and builds the same calibration samples; the quantize phase (calibration forwards
over a rank's 1/N of the samples, GPTQ column loops over 1/N of each group's rows) divides by N, except what every
rank repeats in full (`Estimate.repeated_s`: GPTQ's factorizations and per-column steps); everything rank 0 does
alone (load, source and quantized evaluation, export, verification, report) does not divide. The collectives' cost
is not modelled (a note says so). Each rank's peak host memory is the single process's peak less the (N-1)/N of the
calibration activations it no longer holds; on one machine the ranks need N times that together.
"""

from __future__ import annotations

import dataclasses

from qwenquant.estimate.result import Estimate, gib

SHARED = ("quantize",)  # the phases the ranks split


def with_ranks(est: Estimate, nproc: int, machine_ranks: int) -> Estimate:
    """`est` (a single process's estimate) for `nproc` ranks, `machine_ranks` of them on this machine: per-rank
    time and memory in `ranks`, the quantize phase and the total divided accordingly, and a reason (exit 5) when
    the machine's ranks together do not fit its host memory."""
    if nproc <= 1:
        return est
    t = dict(est.timings_s)
    single_total = t["total"]
    repeated = est.repeated_s or {}
    t["stages"] = {k: min(repeated.get(k, 0.0), v) + max(v - repeated.get(k, 0.0), 0.0) / nproc
                   for k, v in t["stages"].items()}
    t["quantize"] = sum(t["stages"].values())
    t["total"] = single_total - est.timings_s["quantize"] + t["quantize"]
    m = est.memory
    calib = m["peak_host_breakdown"].get("calibration activations", 0) if m["peak_host_phase"] == "quantize" else 0
    per_rank = m["peak_host_bytes"] - calib * (nproc - 1) // nproc
    together = per_rank * machine_ranks
    reasons = list(est.reasons)
    avail = m["available_host_bytes"]
    fits_host = avail is None or together <= avail
    if not fits_host:
        reasons.append(f"{machine_ranks} ranks on this machine need {gib(together)} of host memory together "
                       f"({gib(per_rank)} each), {gib(avail)} available: use fewer ranks per machine")
    ranks = {"world_size": nproc, "ranks_on_this_machine": machine_ranks, "peak_host_bytes_per_rank": per_rank,
             "peak_host_bytes_this_machine": together, "total_s_one_process": single_total,
             "quantize_s_one_process": est.timings_s["quantize"],
             "expected_speedup": single_total / t["total"] if t["total"] else 1.0}
    notes = [*est.notes, f"{nproc} ranks: the quantize phase (calibration forwards, GPTQ solves) divided by {nproc}, "
             "less what every rank repeats (GPTQ's factorizations and per-column steps); load, evaluation, export and "
             "verification run on rank 0 alone; the collectives' cost is not modelled (measured 1 vs 2 gloo ranks: "
             "benchmarks/results/distributed.md)"]
    return dataclasses.replace(est, timings_s=t, reasons=reasons, notes=notes, ranks=ranks,
                               fits=est.fits | {"host": est.fits["host"] and fits_host})
