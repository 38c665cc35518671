"""`--calib chat`: the shipped conversations are true to their paragraphs, in the stated mix, reproducible from
../shared, and rendered through the model's own chat template; user chat files work; bad ones are refused."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenquant.calibration import BUILTIN_DIR, load_calibration
from qwenquant.chat_calibration import CHAT_FILE, read_conversations, render
from qwenquant.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = BUILTIN_DIR / CHAT_FILE


def _records() -> list[dict]:
    return [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]


def test_shipped_mix_is_as_stated():
    records = _records()
    assert len(records) == 512
    assert sum(r["thinking"] for r in records) == 256  # half thinking, half non-thinking
    assert {r["lang"] for r in records[:2]} == {"en", "zh"} and sum(r["lang"] == "zh" for r in records) == 256
    for r in records:
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        for a in answers:  # thinking turns carry reasoning; non-thinking ones the empty block Qwen3 writes
            if r["thinking"]:
                assert re.match(r"<think>\n.+\n</think>\n\n.+", a, re.S), a[:80]
            else:
                assert a.startswith("<think>\n\n</think>\n\n") and len(a) > 20
    assert sum(any(m["role"] == "system" for m in r["messages"]) for r in records) == 128
    assert sum(len(r["messages"]) - any(m["role"] == "system" for m in r["messages"]) == 4 for r in records) == 128


def test_answers_come_from_the_passage():
    """Every summarise / find answer is a sentence of the user's passage: the conversations teach nothing false."""
    checked = 0
    for r in _records():
        if r["task"] not in ("summarise", "find"):
            continue
        user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        passage = user.split("\n\n", 1)[1]
        first = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        answer = first.split("</think>\n\n", 1)[1].strip("\u201c\u201d“”")
        assert answer in passage, (r["task"], answer[:60])
        checked += 1
    assert checked > 200


def test_shipped_file_matches_its_provenance(shared_dir, tmp_path):
    """calibration/build_chat.py rebuilds the shipped bytes from ../shared; README records the same sha256."""
    out = tmp_path / "chat.jsonl"
    subprocess.run([sys.executable, str(REPO / "calibration/build_chat.py"), "--shared", str(shared_dir), "--out",
                    str(out)], check=True, capture_output=True)
    assert out.read_bytes() == SHIPPED.read_bytes()
    digest = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert digest in (REPO / "calibration/README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def mini_tokenizer(mini_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mini_model)


def test_samples_are_rendered_through_the_template(mini_tokenizer):
    ids = load_calibration("chat", mini_tokenizer, 16, 256, seed=0)
    assert tuple(ids.shape) == (16, 256)
    start, think_open = mini_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<think>"])
    flat = ids.flatten().tolist()
    assert flat.count(start) >= 16 and flat.count(think_open) >= 8  # markers are single special tokens
    assert not (load_calibration("chat", mini_tokenizer, 16, 256, seed=1) == ids).all()  # the seed shuffles
    zh = mini_tokenizer.decode(load_calibration("chat:zh", mini_tokenizer, 2, 128, seed=0)[0])
    assert re.search(r"[\u4e00-\u9fff]", zh) and "<|im_start|>" in zh


def test_user_chat_file(mini_tokenizer, tmp_path):
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"messages": conv}) for _ in range(40)) + "\n")
    ids = load_calibration(str(path), mini_tokenizer, 2, 64, seed=0)
    text = mini_tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>")


def test_bad_chat_input(mini_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(BadInputError, match='"role"'):
        load_calibration(str(bad), mini_tokenizer, 1, 8, 0)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n" + json.dumps({"text": "b"}))
    with pytest.raises(BadInputError, match=r'mixed\.jsonl:2: no "messages"'):
        read_conversations(mixed)

    class NoTemplate:
        chat_template = None

    with pytest.raises(BadInputError, match="no chat template.*--calib builtin"):
        render([[{"role": "user", "content": "x"}]], NoTemplate())


def test_cli_gptq_with_chat_calibration(cli, tiny_qwen3, eval_text, tmp_path):
    out = tmp_path / "out"
    res = cli(["gptq", "--model", tiny_qwen3, "--calib", "chat", "--num-samples", "4", "--seq-len", "64",
               "--eval-windows", "1", "--eval-window", "128", "--eval-text", eval_text, "--device", "cpu",
               "--out", out, "--quiet"])
    assert res.code == 0, res.err
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["recipe"]["calibration"]["dataset"] == "chat"
    assert report["calibration"]["tokens"] == 4 * 64
