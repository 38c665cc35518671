"""Multiple-choice accuracy through lm-eval's harness, on local copies of the standard task files (no hub).

Local tasks (task YAMLs in `qwenquant/eval/tasks/`, prompts and metrics as in lm-eval's own task definitions):

| name        | lm-eval task          | file (under the tasks data dir)                 | metrics       |
|-------------|-----------------------|-------------------------------------------------|---------------|
| hellaswag   | qwenquant_hellaswag   | hellaswag/hellaswag_val_1000.jsonl              | acc, acc_norm |
| piqa        | qwenquant_piqa        | piqa/valid.jsonl + piqa/valid-labels.lst        | acc, acc_norm |
| arc_easy    | qwenquant_arc_easy    | arc_easy/arc_easy_test.jsonl                    | acc, acc_norm |
| winogrande  | qwenquant_winogrande  | winogrande/winogrande_dev.jsonl (partial eval.) | acc           |
| ceval       | qwenquant_ceval       | ceval/val/*.csv + ceval/subject_mapping.json    | acc, acc_norm |

C-Eval is one task over all 52 subjects' validation questions (micro average, as lm-eval's `ceval-valid` group
with weight_by_size), its questions interleaved subject by subject so that `limit` N samples every subject.
All tasks are zero-shot. The data dir is `$QWENQUANT_TASKS_DIR`, else `../shared/data/tasks` beside the working
directory or the repository. Any other name is handed to lm-eval as is (it needs the hub for its data).

The YAMLs name the loaders below with `!function qwenquant.eval.tasks.load_<task>`; lm-eval calls them with the
task metadata, where `evaluate_tasks` puts the data dir (`qwenquant_tasks_dir`), so the same YAMLs also work with
`lm_eval --include_path <this package>/eval/tasks --tasks qwenquant_piqa`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenquant.errors import BadInputError

TASKS_YAML_DIR = Path(__file__).resolve().with_name("tasks")  # qwenquant/eval/tasks/ (YAML only, not a package)
TASKS_DIR_ENV = "QWENQUANT_TASKS_DIR"
TASKS_DIR_CANDIDATES = ("../shared/data/tasks", "../../shared/data/tasks")
METADATA_KEY = "qwenquant_tasks_dir"

# user-facing name -> lm-eval task name defined in qwenquant/eval/tasks/*.yaml
LOCAL_TASKS = {
    "hellaswag": "qwenquant_hellaswag",
    "piqa": "qwenquant_piqa",
    "arc_easy": "qwenquant_arc_easy",
    "winogrande": "qwenquant_winogrande",
    "ceval": "qwenquant_ceval",
}
DEFAULT_TASKS = tuple(LOCAL_TASKS)
# files each local task reads, relative to the data dir
TASK_FILES = {
    "hellaswag": ("hellaswag/hellaswag_val_1000.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc_easy/arc_easy_test.jsonl",),
    "winogrande": ("winogrande/winogrande_dev.jsonl",),
    "ceval": ("ceval/val", "ceval/subject_mapping.json"),
}
NUM_FEWSHOT = 0
# log-likelihood batches (qwenquant/eval/loglikelihood.py): at most this many requests (--batch-size) and padded
# tokens per forward; the token cap bounds activations and kept logits (tokens x vocab, float32)
DEFAULT_BATCH_SIZE = 64
MAX_BATCH_TOKENS = 4096

_LM_TO_LOCAL = {v: k for k, v in LOCAL_TASKS.items()}


# ----------------------------------------------------------------------------------------------- the data dir


def find_tasks_dir(explicit: str | Path | None = None) -> Path | None:
    """The task data dir: `explicit`, $QWENQUANT_TASKS_DIR, or ../shared/data/tasks beside the working dir or repo."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(TASKS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo):
        for rel in TASKS_DIR_CANDIDATES:
            p = (base / rel).resolve()
            if p.is_dir():
                return p
    return None


def require_task_files(task: str, tasks_dir: str | Path | None = None) -> Path:
    """The data dir, after checking that the files of local `task` are there; one-line BadInputError if not."""
    root = find_tasks_dir(tasks_dir)
    if root is None:
        raise BadInputError(
            f"task {task}: local task data not found (looked for {TASKS_DIR_CANDIDATES[0]} beside the working dir "
            f"and the repo); set {TASKS_DIR_ENV} or --tasks-dir to the folder holding {', '.join(TASK_FILES)}"
        )
    if not root.is_dir():
        raise BadInputError(f"task {task}: task data dir {root} does not exist; set {TASKS_DIR_ENV} or --tasks-dir")
    for rel in TASK_FILES[task]:
        if not (root / rel).exists():
            raise BadInputError(f"task {task}: {root / rel} is missing from the task data dir {root}")
    return root


# ------------------------------------------------------------------------------- readers (plain lists of dicts)


def _jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: unreadable task file ({type(err).__name__}: {err})") from err


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py `preprocess` (WikiHow bracket artifacts removed)."""
    import re

    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(root: Path) -> list[dict]:
    """HellaSwag validation (original format) -> {query, choices, gold} as lm-eval's hellaswag `process_docs`."""
    docs = []
    for d in _jsonl(root / TASK_FILES["hellaswag"][0]):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        docs.append({
            "ind": d.get("ind"),
            "activity_label": d["activity_label"],
            "query": _hellaswag_preprocess(d["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(e) for e in d["endings"]],
            "gold": int(d["label"]),
        })
    return docs


def read_piqa(root: Path) -> list[dict]:
    """PIQA validation: official valid.jsonl (goal, sol1, sol2) with labels from valid-labels.lst."""
    docs = _jsonl(root / TASK_FILES["piqa"][0])
    labels_path = root / TASK_FILES["piqa"][1]
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise BadInputError(f"task piqa: {labels_path} has {len(labels)} labels for {len(docs)} questions")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(lab)} for d, lab in zip(docs, labels)]


def read_arc_easy(root: Path) -> list[dict]:
    """ARC-Easy test in llm-foundry's format: query carries the `Question: ` prefix already."""
    return [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])}
            for d in _jsonl(root / TASK_FILES["arc_easy"][0])]


def read_winogrande(root: Path) -> list[dict]:
    """WinoGrande dev in llm-foundry's format: two contexts (the blank filled by each option), one continuation."""
    return [{"context_options": list(d["context_options"]), "continuation": d["continuation"], "gold": int(d["gold"])}
            for d in _jsonl(root / TASK_FILES["winogrande"][0])]


def read_ceval(root: Path) -> list[dict]:
    """C-Eval validation, all subjects, interleaved round-robin (subjects in sorted order) so a limit covers all."""
    mapping_path = root / TASK_FILES["ceval"][1]
    try:
        mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BadInputError(f"{mapping_path}: unreadable ({type(err).__name__})") from err
    per_subject = []
    files = sorted((root / TASK_FILES["ceval"][0]).glob("*_val.csv"))
    if not files:
        raise BadInputError(f"task ceval: no *_val.csv files in {root / TASK_FILES['ceval'][0]}")
    for path in files:
        subject = path.name[: -len("_val.csv")]
        names = mapping.get(subject, [subject, subject, "Other"])
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        docs = []
        for r in rows:
            if r.get("answer") not in ("A", "B", "C", "D"):
                raise BadInputError(f"{path}: row id {r.get('id')} has answer {r.get('answer')!r}, not A-D")
            docs.append({"subject": subject, "subject_zh": names[1], "category": names[2], "id": int(r["id"]),
                         "question": r["question"], "A": r["A"], "B": r["B"], "C": r["C"], "D": r["D"],
                         "answer": r["answer"]})
        per_subject.append(docs)
    out = []
    for i in range(max(len(d) for d in per_subject)):
        out.extend(d[i] for d in per_subject if i < len(d))
    return out


READERS = {
    "hellaswag": read_hellaswag,
    "piqa": read_piqa,
    "arc_easy": read_arc_easy,
    "winogrande": read_winogrande,
    "ceval": read_ceval,
}


def read_task(task: str, tasks_dir: str | Path | None = None) -> list[dict]:
    """The documents of a local task (user name, e.g. `piqa`), in evaluation order."""
    if task not in READERS:
        raise BadInputError(f"unknown local task {task!r}; local tasks: {', '.join(LOCAL_TASKS)}")
    return READERS[task](require_task_files(task, tasks_dir))


# ------------------------------------------------------------------------ lm-eval `custom_dataset` entry points


def _dataset(task: str, kwargs: dict):
    import datasets

    docs = read_task(task, kwargs.get(METADATA_KEY))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def load_hellaswag(**kwargs):
    return _dataset("hellaswag", kwargs)


def load_piqa(**kwargs):
    return _dataset("piqa", kwargs)


def load_arc_easy(**kwargs):
    return _dataset("arc_easy", kwargs)


def load_winogrande(**kwargs):
    return _dataset("winogrande", kwargs)


def load_ceval(**kwargs):
    return _dataset("ceval", kwargs)


# ---------------------------------------------------------------------------------------- resolving task names


@dataclass
class TaskPlan:
    """Requested task names resolved to lm-eval names, with the TaskManager that knows them all."""

    names: list[str]  # as the user wrote them (local aliases normalised: `qwenquant_piqa` -> `piqa`)
    lm_names: dict[str, str]  # name -> lm-eval task/group/tag name
    tasks_dir: Path | None  # data dir of the local tasks (None when none is needed and none was found)
    include_path: list[Path] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)  # names handed to lm-eval's own task registry
    _manager: Any = None

    @property
    def task_manager(self):
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            meta = {METADATA_KEY: str(self.tasks_dir)} if self.tasks_dir is not None else None
            self._manager = TaskManager(include_path=[str(TASKS_YAML_DIR), *map(str, self.include_path)],
                                        include_defaults=bool(self.passthrough), metadata=meta)
        return self._manager


def parse_task_list(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`"piqa, arc_easy"` or a list -> ["piqa", "arc_easy"] (duplicates dropped); None -> the five local tasks."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    items = tasks.split(",") if isinstance(tasks, str) else [t for x in tasks for t in str(x).split(",")]
    names = []
    for t in (x.strip() for x in items):
        if t and t not in names:
            names.append(t)
    if not names:
        raise BadInputError(f"--tasks is empty; local tasks: {', '.join(LOCAL_TASKS)}")
    return names


def _unknown(name: str) -> BadInputError:
    return BadInputError(
        f"unknown task {name!r}; local tasks: {', '.join(LOCAL_TASKS)} (other lm-eval task names are passed to "
        "lm-eval and need the hub; your own YAMLs go in --include-path)"
    )


def _mentioned_in_lm_eval(name: str) -> bool:
    """Cheap pre-check (~1 s) before indexing lm-eval's ~15k task YAMLs (~25 s): does any of them mention `name`?"""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    for p in root.rglob("*"):
        if p.suffix in (".yaml", ".yml", ".py") or p.name.startswith("_default"):
            try:
                if name in p.read_text(encoding="utf-8", errors="ignore"):
                    return True
            except OSError:
                continue
    return False


def _yaml_task_names(folder: Path) -> set[str]:
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=str(folder), include_defaults=False).all_tasks)


def resolve_tasks(tasks: str | list[str] | None, include_path: str | Path | list | None = None,
                  tasks_dir: str | Path | None = None) -> TaskPlan:
    """Check every task name and the local data before any model is loaded; one-line BadInputError otherwise."""
    names = parse_task_list(tasks)
    includes = [] if include_path is None else [Path(p).expanduser() for p in
                                                (include_path if isinstance(include_path, (list, tuple)) else [include_path])]
    for inc in includes:
        if not inc.is_dir():
            raise BadInputError(f"--include-path {inc}: no such directory")
    user_tasks = set().union(*(_yaml_task_names(inc) for inc in includes)) if includes else set()
    out, lm_names, passthrough, root = [], {}, [], None
    for name in names:
        local = _LM_TO_LOCAL.get(name, name)
        if local in LOCAL_TASKS and name not in user_tasks:
            root = require_task_files(local, tasks_dir)
            out.append(local)
            lm_names[local] = LOCAL_TASKS[local]
        elif name in user_tasks:
            out.append(name)
            lm_names[name] = name
        elif _mentioned_in_lm_eval(name):
            out.append(name)
            lm_names[name] = name
            passthrough.append(name)
        else:
            raise _unknown(name)
    if root is None:  # no local task asked for; --include-path YAMLs may still use our loaders
        found = find_tasks_dir(tasks_dir)
        root = found if found is not None and found.is_dir() else None
    plan = TaskPlan(out, lm_names, root, includes, passthrough)
    if passthrough:  # confirm against lm-eval's real index (slow: only when a non-local name was given)
        known = set(plan.task_manager.all_tasks)
        for name in passthrough:
            if name not in known:
                raise _unknown(name)
        # and fetch their data now, so that a task that cannot get its data fails before a model is loaded
        with _quiet_lm_eval(quiet=False):
            try:
                plan.task_manager.load(list(passthrough))
            except Exception as err:
                raise _lm_eval_failed(passthrough, err) from err
    return plan


def _lm_eval_failed(names: list[str], err: Exception) -> BadInputError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return BadInputError(f"lm-eval could not run {', '.join(names)}: {type(err).__name__}: {first}"
                         + ("" if all(n in LOCAL_TASKS for n in names) else
                            " (tasks other than the local ones read their data from the hub)"))


# ------------------------------------------------------------------------------------------------- evaluation


def _num(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _n_samples(results: dict, name: str) -> int | None:
    ns = results.get("n-samples", {})
    if name in ns:
        return int(ns[name].get("effective", ns[name].get("original")))
    children = results.get("group_subtasks", {}).get(name)
    if children:
        parts = [_n_samples(results, c) for c in children]
        return sum(p for p in parts if p is not None)
    return None


def _metrics(results: dict, name: str) -> dict:
    r = results["results"][name]
    return {
        "acc": _num(r.get("acc,none")),
        "acc_stderr": _num(r.get("acc_stderr,none")),
        "acc_norm": _num(r.get("acc_norm,none")),
        "acc_norm_stderr": _num(r.get("acc_norm_stderr,none")),
        "n": _n_samples(results, name),
    }


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool):
    """Keep stdout clean for --json (lm-eval may print there) and drop lm-eval's per-task INFO/WARNING lines (they
    advise on lm-eval's own CLI); with `quiet` also its progress bars. lm-eval's environment probe (a `git describe`
    subprocess that prints "fatal: not a git repository" outside a repo, and torch's collect_env) is skipped: the
    qwenquant report records the environment itself."""
    import io

    import lm_eval.evaluator as ev

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    old_levels = [lg.level for lg in loggers]
    saved = {k: getattr(ev, k) for k in ("get_git_commit_hash", "add_env_info") if hasattr(ev, k)}
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if "get_git_commit_hash" in saved:
            ev.get_git_commit_hash = lambda: None
        if "add_env_info" in saved:
            ev.add_env_info = lambda storage: None
        with contextlib.ExitStack() as stack:
            sink = io.StringIO() if quiet else sys.stderr
            stack.enter_context(contextlib.redirect_stdout(sink))
            if quiet:
                stack.enter_context(contextlib.redirect_stderr(sink))
            yield
    finally:
        for lg, lvl in zip(loggers, old_levels):
            lg.setLevel(lvl)
        for k, v in saved.items():
            setattr(ev, k, v)


def run_tasks(model, tokenizer, plan: TaskPlan, limit: int | None, batch_size: int = DEFAULT_BATCH_SIZE,
              quiet: bool = True) -> dict:
    """Evaluate an already-placed model on a resolved plan: {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}.
    Log-likelihood requests run batched (`qwenquant.eval.loglikelihood`, at most `batch_size` per forward), and on
    the CPU every forward computes in float32 (`qwenquant.eval.precision`)."""
    import torch
    from lm_eval import simple_evaluate

    from qwenquant.eval.loglikelihood import BatchedLM
    from qwenquant.eval.precision import evaluation_precision

    if limit is not None and limit < 1:
        raise BadInputError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    with _quiet_lm_eval(quiet), evaluation_precision(model, device):
        lm = BatchedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32,
                       max_batch_tokens=MAX_BATCH_TOKENS)
        try:
            results = simple_evaluate(
                model=lm, tasks=[plan.lm_names[n] for n in plan.names], num_fewshot=None, limit=limit,
                task_manager=plan.task_manager, log_samples=False, bootstrap_iters=100000,
            )
        except BadInputError:
            raise
        except Exception as err:
            raise _lm_eval_failed(plan.names, err) from err
    if results is None:
        raise BadInputError("lm-eval returned no results (non-zero rank)")
    out = {}
    for name in plan.names:
        lm_name = plan.lm_names[name]
        if lm_name in results["results"]:
            out[name] = _metrics(results, lm_name)
        else:  # a tag: lm-eval reports its member tasks, not the tag
            for sub in sorted(results["results"]):
                if sub not in out and sub not in plan.lm_names.values():
                    out[sub] = _metrics(results, sub)
    return out


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int = DEFAULT_BATCH_SIZE,
                   device=None, include_path=None, tasks_dir=None, quiet: bool = True) -> dict[str, dict]:
    """Zero-shot multiple-choice accuracy of a loaded causal LM through lm-eval.

    `tasks` are local names (hellaswag, piqa, arc_easy, winogrande, ceval), names from `include_path` YAMLs or other
    lm-eval task names (hub). The model is moved to `device` (None: leave it where it is). Returns
    {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}; metrics a task does not define are None.
    """
    plan = resolve_tasks(tasks, include_path, tasks_dir)
    if device is not None:
        model.to(device)
    model.eval()
    return run_tasks(model, tokenizer, plan, limit, batch_size, quiet=quiet)
