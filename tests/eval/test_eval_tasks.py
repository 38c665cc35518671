"""Local lm-eval task definitions (qwenquant/eval/tasks/*.yaml + qwenquant.eval.tasks): the files under
../shared/data/tasks load with the right number of documents and gold labels, lm-eval builds the standard prompts
from them, task names resolve (or fail with one line), and `evaluate_tasks` scores qwen3-mini."""

from __future__ import annotations

import json
import shutil

import pytest

from qwenquant.errors import BadInputError
from qwenquant.eval import tasks as T


@pytest.fixture(scope="session")
def tasks_dir(shared_dir):
    d = shared_dir / "data" / "tasks"
    if not d.is_dir():
        pytest.skip(f"task data not found at {d}")
    return d


@pytest.fixture(scope="session")
def loaded(tasks_dir):
    """All five local tasks built by lm-eval's TaskManager from our YAMLs (data read once per session)."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    plan = T.resolve_tasks(None, tasks_dir=tasks_dir)
    return plan, plan.task_manager.load([plan.lm_names[n] for n in plan.names])["tasks"]


# ------------------------------------------------------------------------------------------ the raw readers


def test_hellaswag_records(tasks_dir) -> None:
    docs = T.read_task("hellaswag", tasks_dir)
    assert len(docs) == 1000
    assert [d["gold"] for d in docs[:3]] == [3, 2, 0]
    assert docs[0]["query"] == ("Pole vault: Pole vault is a sport where you run with a pole and stop and swing "
                                "your body. A few women")  # lm-eval's "<label>: <ctx_a> <Ctx_b>"
    assert docs[0]["choices"][3].startswith("are in the gym practicing")
    assert all(len(d["choices"]) == 4 and 0 <= d["gold"] < 4 for d in docs)


def test_piqa_records(tasks_dir) -> None:
    docs = T.read_task("piqa", tasks_dir)
    assert len(docs) == 1838
    assert [d["label"] for d in docs[:3]] == [0, 1, 1]  # valid-labels.lst, line by line
    assert docs[1]["goal"] == "dresser" and docs[1]["sol1"] == "replace drawer with bobby pin "
    assert {d["label"] for d in docs} == {0, 1}


def test_arc_easy_records(tasks_dir) -> None:
    docs = T.read_task("arc_easy", tasks_dir)
    assert len(docs) == 2376
    assert [d["gold"] for d in docs[:2]] == [0, 1]
    assert docs[1]["choices"][1] == "breathing mask"
    assert all(d["query"].startswith("Question: ") for d in docs)


def test_winogrande_records(tasks_dir) -> None:
    docs = T.read_task("winogrande", tasks_dir)
    assert len(docs) == 1267
    assert [d["gold"] for d in docs[:2]] == [1, 0]
    assert docs[0]["context_options"] == ["Sarah was a much better surgeon than Maria so Sarah",
                                          "Sarah was a much better surgeon than Maria so Maria"]
    assert docs[0]["continuation"] == "always got the easier cases."


def test_ceval_records_interleaved_by_subject(tasks_dir) -> None:
    docs = T.read_task("ceval", tasks_dir)
    assert len(docs) == 1346
    subjects = sorted(p.name[: -len("_val.csv")] for p in (tasks_dir / "ceval" / "val").glob("*_val.csv"))
    assert len(subjects) == 52
    # round-robin: the first 52 documents are question 0 of every subject, in sorted subject order
    assert [d["subject"] for d in docs[:52]] == subjects
    first = docs[0]
    assert (first["subject"], first["id"], first["answer"], first["subject_zh"]) == ("accountant", 0, "D", "注册会计师")
    assert first["question"].startswith("下列关于税法基本原则的表述中")
    assert docs[52]["subject"] == "accountant" and docs[52]["id"] == 1 and docs[52]["answer"] == "C"
    mapping = json.loads((tasks_dir / "ceval" / "subject_mapping.json").read_text(encoding="utf-8"))
    assert set(subjects) == set(mapping)


# ------------------------------------------------------------------------------ through lm-eval's TaskManager


def test_lm_eval_builds_standard_prompts(loaded) -> None:
    plan, tasks = loaded
    assert set(tasks) == set(T.LOCAL_TASKS.values())
    sizes = {name: len(task.eval_docs) for name, task in tasks.items()}
    assert sizes == {"qwenquant_hellaswag": 1000, "qwenquant_piqa": 1838, "qwenquant_arc_easy": 2376,
                     "qwenquant_winogrande": 1267, "qwenquant_ceval": 1346}

    piqa = tasks["qwenquant_piqa"]
    d = piqa.eval_docs[1]
    assert piqa.doc_to_text(d) == "Question: dresser\nAnswer:"
    assert piqa.doc_to_choice(d) == ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "]
    assert piqa.doc_to_target(d) == 1

    arc = tasks["qwenquant_arc_easy"]
    d = arc.eval_docs[1]
    assert arc.doc_to_text(d).endswith("respiratory system?\nAnswer:") and arc.doc_to_target(d) == 1

    hs = tasks["qwenquant_hellaswag"]
    assert hs.doc_to_target(hs.eval_docs[0]) == 3 and len(hs.doc_to_choice(hs.eval_docs[0])) == 4

    # WinoGrande is partial evaluation: the gold index is "the text", the contexts are the choices
    wg = tasks["qwenquant_winogrande"]
    d = wg.eval_docs[0]
    assert wg.multiple_input == 2
    assert wg.doc_to_text(d) == 1 and wg.doc_to_target(d) == "always got the easier cases."

    ce = tasks["qwenquant_ceval"]
    d = ce.eval_docs[0]
    assert ce.doc_to_choice(d) == ["A", "B", "C", "D"] and ce.doc_to_target(d) == 3
    ctx = ce.fewshot_context(d, num_fewshot=0)
    assert ctx.startswith("以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n下列关于税法基本原则")
    assert ctx.endswith("\nD. 税务机关按法定程序依法征税，可以自由做出减征、停征或免征税款的决定\n答案：")


def test_metrics_follow_lm_eval(loaded) -> None:
    _, tasks = loaded
    for name, task in tasks.items():
        metrics = {m["metric"] for m in task.config.metric_list}
        assert metrics == ({"acc"} if name == "qwenquant_winogrande" else {"acc", "acc_norm"}), name


# ------------------------------------------------------------------------------------------------ resolving


def test_parse_task_list() -> None:
    assert T.parse_task_list(None) == list(T.DEFAULT_TASKS)
    assert T.parse_task_list(" piqa, arc_easy,,piqa ") == ["piqa", "arc_easy"]
    assert T.parse_task_list(["piqa,ceval", "winogrande"]) == ["piqa", "ceval", "winogrande"]
    with pytest.raises(BadInputError, match="--tasks is empty"):
        T.parse_task_list(" , ")


def test_unknown_task_lists_local_tasks(tasks_dir) -> None:
    with pytest.raises(BadInputError) as err:
        T.resolve_tasks("piqa,no_such_task_xyz", tasks_dir=tasks_dir)
    msg = str(err.value)
    assert "no_such_task_xyz" in msg and "\n" not in msg
    assert all(name in msg for name in T.LOCAL_TASKS)


def test_lm_eval_names_of_local_tasks_are_accepted(tasks_dir) -> None:
    plan = T.resolve_tasks("qwenquant_piqa,ceval", tasks_dir=tasks_dir)
    assert plan.names == ["piqa", "ceval"]
    assert plan.lm_names == {"piqa": "qwenquant_piqa", "ceval": "qwenquant_ceval"}
    assert plan.passthrough == []


def test_missing_data_dir(tmp_path, monkeypatch) -> None:
    with pytest.raises(BadInputError, match="does not exist") as err:
        T.resolve_tasks("piqa", tasks_dir=tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    monkeypatch.setenv(T.TASKS_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(BadInputError, match=T.TASKS_DIR_ENV):
        T.resolve_tasks("piqa")


def test_missing_task_file_is_named(tasks_dir, tmp_path) -> None:
    root = tmp_path / "tasks"
    shutil.copytree(tasks_dir / "piqa", root / "piqa")
    assert T.resolve_tasks("piqa", tasks_dir=root).tasks_dir == root
    with pytest.raises(BadInputError, match=r"task hellaswag: .*hellaswag_val_1000\.jsonl is missing"):
        T.resolve_tasks("piqa,hellaswag", tasks_dir=root)
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(BadInputError, match="2 labels for 1838 questions"):
        T.read_task("piqa", root)


def test_include_path_task(tasks_dir, tmp_path) -> None:
    """A user's YAML in --include-path resolves by its own name (here: PIQA under another name)."""
    inc = tmp_path / "mytasks"
    inc.mkdir()
    text = (T.TASKS_YAML_DIR / "qwenquant_piqa.yaml").read_text(encoding="utf-8")
    (inc / "my_piqa.yaml").write_text(text.replace("task: qwenquant_piqa", "task: my_piqa"), encoding="utf-8")
    plan = T.resolve_tasks("my_piqa,arc_easy", include_path=inc, tasks_dir=tasks_dir)
    assert plan.lm_names == {"my_piqa": "my_piqa", "arc_easy": "qwenquant_arc_easy"}
    with pytest.raises(BadInputError, match="no such directory"):
        T.resolve_tasks("piqa", include_path=tmp_path / "absent", tasks_dir=tasks_dir)


# ------------------------------------------------------------------------------------------------ scoring


@pytest.mark.slow
def test_evaluate_tasks_on_qwen3_mini(mini_model, tasks_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(mini_model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(mini_model)
    res = T.evaluate_tasks(model, tokenizer, list(T.DEFAULT_TASKS), limit=20, batch_size=8, device="cpu",
                           tasks_dir=tasks_dir)
    assert list(res) == list(T.DEFAULT_TASKS)
    for name, r in res.items():
        assert r["n"] == 20, name
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] > 0, (name, r)
        if name == "winogrande":
            assert r["acc_norm"] is None and r["acc_norm_stderr"] is None
        else:
            assert 0.0 <= r["acc_norm"] <= 1.0 and r["acc_norm_stderr"] > 0, (name, r)
