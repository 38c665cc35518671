"""Zero-shot task accuracy of a model in a run (source or quantized), when the recipe names tasks."""

from __future__ import annotations

from qwenquant.eval.tasks import evaluate_tasks
from qwenquant.progress import Reporter


def evaluate_recipe_tasks(model, tokenizer, ev, device, reporter: Reporter, label: str) -> dict | None:
    """Zero-shot task accuracy through lm-eval (None when the recipe names no tasks). `ev`: the recipe's eval."""
    if not ev.tasks:
        return None
    reporter.log(f"tasks ({label}): {', '.join(ev.tasks)}")
    return evaluate_tasks(model, tokenizer, list(ev.tasks), ev.task_limit, device=device)
