"""Zero-shot task results of source and result side by side, and the quality gates a pipeline sets on a report."""

from __future__ import annotations

from qwenquant.eval.tasks import evaluate_tasks
from qwenquant.progress import Reporter


def evaluate_recipe_tasks(model, tokenizer, ev, device, reporter: Reporter, label: str) -> dict | None:
    """Zero-shot task accuracy through lm-eval (None when the recipe names no tasks). `ev`: the recipe's eval."""
    if not ev.tasks:
        return None
    reporter.log(f"tasks ({label}): {', '.join(ev.tasks)}")
    return evaluate_tasks(model, tokenizer, list(ev.tasks), ev.task_limit, 8, device)


def merge_task_results(source: dict, quantized: dict, limit: int | None) -> dict:
    """Per task: source and quantized accuracy with standard errors, and recovery = quantized / source."""
    out = {}
    for task, src in source.items():
        q = quantized[task]
        recovery = 100.0 * q["acc"] / src["acc"] if src.get("acc") else None
        out[task] = {"source": src, "quantized": q, "recovery_pct": recovery, "limit": limit}
    return out


def check_gates(report: dict, ev) -> list[dict]:
    """Quality gates from the recipe's eval section, evaluated on the measured report."""
    gates = []
    tasks = report["evaluation"].get("tasks")
    if ev.min_task_recovery_pct is not None and tasks:
        worst_task, worst = min(((t, r["recovery_pct"]) for t, r in tasks.items()), key=lambda x: x[1])
        gates.append({"gate": "min_task_recovery_pct", "limit": ev.min_task_recovery_pct, "measured": worst,
                      "passed": worst >= ev.min_task_recovery_pct,
                      "description": f"{worst_task} recovers {worst:.2f}% of the source accuracy vs limit "
                                     f"{ev.min_task_recovery_pct}%"})
    if ev.max_ppl_increase_pct is not None:
        delta = report["evaluation"]["delta_ppl_pct"]
        gates.append({"gate": "max_ppl_increase_pct", "limit": ev.max_ppl_increase_pct, "measured": delta,
                      "passed": delta <= ev.max_ppl_increase_pct,
                      "description": f"perplexity increase {delta:+.3f}% vs limit {ev.max_ppl_increase_pct}%"})
    return gates
