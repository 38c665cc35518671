"""The quality gates a pipeline sets (`--max-ppl-increase`, `--min-task-recovery`), judged on a run's measured
evaluation, and the per-task comparison they read."""

from __future__ import annotations


def merge_task_results(source: dict, quantized: dict, limit: int | None) -> dict:
    """Per task: source and quantized accuracy with standard errors, and recovery = quantized / source."""
    out = {}
    for task, src in source.items():
        q = quantized[task]
        recovery = 100.0 * q["acc"] / src["acc"] if src.get("acc") else None
        out[task] = {"source": src, "quantized": q, "recovery_pct": recovery, "limit": limit}
    return out


def check_gates(evaluation: dict, ev) -> list[dict]:
    """Quality gates from the recipe's eval section `ev`, judged on the report's measured `evaluation` section."""
    gates = []
    tasks = evaluation.get("tasks")
    if ev.min_task_recovery_pct is not None and tasks:
        worst_task, worst = min(((t, r["recovery_pct"]) for t, r in tasks.items()), key=lambda x: x[1])
        gates.append({"gate": "min_task_recovery_pct", "limit": ev.min_task_recovery_pct, "measured": worst,
                      "passed": worst >= ev.min_task_recovery_pct,
                      "description": f"{worst_task} recovers {worst:.2f}% of the source accuracy vs limit "
                                     f"{ev.min_task_recovery_pct}%"})
    if ev.max_ppl_increase_pct is not None:
        delta = evaluation["delta_ppl_pct"]
        gates.append({"gate": "max_ppl_increase_pct", "limit": ev.max_ppl_increase_pct, "measured": delta,
                      "passed": delta <= ev.max_ppl_increase_pct,
                      "description": f"perplexity increase {delta:+.3f}% vs limit {ev.max_ppl_increase_pct}%"})
    return gates
