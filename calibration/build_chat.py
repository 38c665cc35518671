"""Build the shipped chat calibration set (`--calib chat`) from the paragraph files in ../shared/data/calibration.

    python calibration/build_chat.py [--shared ../shared] [--out qwenquant/data/calibration/chat.jsonl]
    python calibration/build_chat.py --held-out [--out held_out_chat.jsonl]   # the benchmark's held-out set

Each record is one conversation, `{"messages": [{"role", "content"}...], "thinking": bool, "lang", "task",
"source"}`, made from one paragraph by a templated task whose answer is taken from the paragraph itself (so every
answer is true): summarise (the first sentence), continue (the rest of the text), find the sentence that mentions a
word, count the sentences, and, for Chinese, name the topic (the article title). Half the conversations think:
their assistant turns are `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`, the reasoning a templated walk through the
paragraph; the other half are non-thinking turns as Qwen3 writes them with `enable_thinking=False`
(`<think>\\n\\n</think>\\n\\n{answer}`). A quarter carry a system prompt and a quarter a second user turn.

Sources (licences in ../shared/data/README.md): English from WikiText-2 validation paragraphs (CC BY-SA 3.0);
Chinese from the CMRC 2018 Wikipedia contexts (CC BY-SA 4.0), the first 896 of them: qwen3-mini held out the last
104, which `--held-out` uses together with WikiText-2 *test* paragraphs (never seen in training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

SEED = 1234
PER_LANG = 256
HELD_OUT_PER_LANG = 48
ZH_HELD_OUT_FROM = 896  # qwen3-mini trained on CMRC contexts [0, 896); [896, 1000) are held out

SYSTEM = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}
ASK = {
    "en": {
        "summarise": "Summarise the following passage in one sentence.\n\n{p}",
        "continue": "Continue this text:\n\n{p}",
        "find": "Which sentence of this passage mentions \u201c{w}\u201d? Quote it.\n\n{p}",
        "count": "How many sentences does this passage have?\n\n{p}",
        "follow_count": "Thanks. And how many sentences were in that passage?",
        "follow_summarise": "Thanks. Now summarise that passage in one sentence.",
    },
    "zh": {
        "summarise": "请用一句话概括下面这段文字。\n\n{p}",
        "continue": "请续写这段文字：\n\n{p}",
        "find": "这段文字中哪一句提到了“{w}”？请引用原句。\n\n{p}",
        "count": "这段文字有几句话？\n\n{p}",
        "topic": "这段文字的主题是什么？\n\n{p}",
        "follow_count": "谢谢。那段文字一共有几句话？",
        "follow_summarise": "谢谢。请再用一句话概括那段文字。",
    },
}
THINK = {
    "en": {
        "summarise": "The passage has {n} sentences. The first one states the topic: \u201c{s1}\u201d The others add "
                     "details, so the summary can follow the first sentence.",
        "continue": "The text stops after \u201c{last}\u201d I should continue on the same topic and in the same style.",
        "find": "I need the sentence with \u201c{w}\u201d. Going through the {n} sentences in order, sentence {k} "
                "contains it.",
        "count": "Splitting at the sentence ends: {listing}. That makes {n}.",
    },
    "zh": {
        "summarise": "这段文字共有{n}句。第一句点明了主题：“{s1}”其余各句补充细节，所以概括可以沿用第一句。",
        "continue": "原文停在“{last}”之后，续写应保持同一主题和文风。",
        "find": "要找提到“{w}”的句子。按顺序检查这{n}句，第{k}句包含它。",
        "count": "按句号切分：{listing}。一共{n}句。",
        "topic": "文中多次出现“{t}”，各句都围绕它展开，所以主题是{t}。",
    },
}
ANSWER = {
    "en": {"count": "It has {n} sentences.", "find": "\u201c{s}\u201d"},
    "zh": {"count": "一共有{n}句话。", "find": "“{s}”", "topic": "这段文字的主题是{t}。"},
}


def sentences(text: str, lang: str) -> list[str]:
    """WikiText separates tokens with spaces (`word .`); Chinese ends sentences with 。！？"""
    if lang == "en":
        parts = re.split(r"(?<= \.) (?=[A-Z0-9\"'(])", text.strip())
    else:
        parts = re.split(r"(?<=[。！？])", text.strip())
    return [p.strip() for p in parts if p.strip()]


def _unique_word(sents: list[str], lang: str, rng: random.Random) -> tuple[str, int] | None:
    """A word (en: a capitalised word of >= 5 letters; zh: a 2-4 character span) found in exactly one sentence."""
    candidates = []
    for k, s in enumerate(sents):
        words = re.findall(r"\b[A-Z][a-z]{4,}\b", s) if lang == "en" else \
            [s[i:i + 3] for i in range(0, max(0, len(s) - 3), 5) if re.fullmatch(r"[\u4e00-\u9fff]{3}", s[i:i + 3])]
        for w in words:
            if sum(w in t for t in sents) == 1:
                candidates.append((w, k))
    return rng.choice(candidates) if candidates else None


def _listing(sents: list[str], lang: str) -> str:
    heads = [" ".join(s.split()[:3]) if lang == "en" else s[:4] for s in sents]
    return ("; " if lang == "en" else "；").join(f"{i} {h}..." for i, h in enumerate(heads, 1))


def _turn(lang: str, task: str, para: str, sents: list[str], rng: random.Random, title: str | None):
    """(user text, reasoning, answer) of one task on one paragraph, or None where the task does not apply."""
    n = len(sents)
    if task == "summarise":
        return ASK[lang][task].format(p=para), THINK[lang][task].format(n=n, s1=sents[0]), sents[0]
    if task == "continue":
        cut = max(1, n // 2)
        head, rest = sents[:cut], sents[cut:]
        joiner = " " if lang == "en" else ""
        return ASK[lang][task].format(p=joiner.join(head)), THINK[lang][task].format(last=head[-1]), joiner.join(rest)
    if task == "find":
        found = _unique_word(sents, lang, rng)
        if found is None:
            return None
        w, k = found
        return (ASK[lang][task].format(p=para, w=w), THINK[lang][task].format(w=w, n=n, k=k + 1),
                ANSWER[lang][task].format(s=sents[k]))
    if task == "count":
        return (ASK[lang][task].format(p=para), THINK[lang][task].format(listing=_listing(sents, lang), n=n),
                ANSWER[lang][task].format(n=n))
    if task == "topic":
        return ASK[lang][task].format(p=para), THINK[lang][task].format(t=title), ANSWER[lang][task].format(t=title)
    raise ValueError(task)


def _assistant(reasoning: str, answer: str, thinking: bool) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}" if thinking else f"<think>\n\n</think>\n\n{answer}"


def conversation(lang: str, record: dict, index: int, rng: random.Random) -> dict | None:
    """One conversation from one paragraph record; None where the paragraph is too short to make one."""
    para = record["text"].strip()
    sents = sentences(para, lang)
    if len(sents) < 3:
        return None
    title = record.get("title") if lang == "zh" and record.get("title") in para else None
    tasks = ["summarise", "continue", "find", "count"] + (["topic"] if title else [])
    task = tasks[index % len(tasks)]
    turn = _turn(lang, task, para, sents, rng, title)
    if turn is None:
        task = "summarise"
        turn = _turn(lang, task, para, sents, rng, title)
    thinking = index % 2 == 0  # the stated mix: half thinking, half non-thinking
    messages = [{"role": "system", "content": SYSTEM[lang]}] if index % 4 == 1 else []
    messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": _assistant(*turn[1:], thinking)}]
    if index % 4 == 3:  # a second user turn on the same paragraph: count its sentences, or summarise it
        if task == "count":
            follow, reasoning, answer = (ASK[lang]["follow_summarise"],
                                         THINK[lang]["summarise"].format(n=len(sents), s1=sents[0]), sents[0])
        else:
            follow, reasoning, answer = (ASK[lang]["follow_count"],
                                         THINK[lang]["count"].format(listing=_listing(sents, lang), n=len(sents)),
                                         ANSWER[lang]["count"].format(n=len(sents)))
        messages += [{"role": "user", "content": follow},
                     {"role": "assistant", "content": _assistant(reasoning, answer, thinking)}]
    return {"messages": messages, "thinking": thinking, "lang": lang, "task": task,
            "source": record.get("source") or record.get("id")}


def _paragraphs(shared: Path, held_out: bool) -> dict[str, list[dict]]:
    if held_out:  # WikiText-2 test paragraphs (>= 200 chars, no headings) and the CMRC contexts qwen3-mini never saw
        rows = (shared / "data/wikitext2/wiki.test.raw").read_text(encoding="utf-8").split("\n")
        en = [{"text": r.strip(), "source": f"wikitext-2 test row {i}"} for i, r in enumerate(rows)
              if len(r.strip()) >= 200 and not r.strip().startswith("=")]
        zh = [json.loads(line) for line in (shared / "data/calibration/zh_wiki_cmrc2018_paragraphs.jsonl").open()]
        return {"en": en, "zh": zh[ZH_HELD_OUT_FROM:]}
    en = [json.loads(line) for line in (shared / "data/calibration/en_wikitext2_valid_paragraphs.jsonl").open()]
    zh = [json.loads(line) for line in (shared / "data/calibration/zh_wiki_cmrc2018_paragraphs.jsonl").open()]
    return {"en": en, "zh": zh[:ZH_HELD_OUT_FROM]}


def build(shared: Path, held_out: bool) -> list[dict]:
    rng = random.Random(SEED + held_out)
    per_lang = HELD_OUT_PER_LANG if held_out else PER_LANG
    out: dict[str, list[dict]] = {}
    for lang, records in _paragraphs(shared, held_out).items():
        order = list(range(len(records)))
        rng.shuffle(order)
        convs = []
        for i in order:
            conv = conversation(lang, records[i], len(convs), rng)
            if conv is not None:
                convs.append(conv)
            if len(convs) == per_lang:
                break
        out[lang] = convs
    return [c for pair in zip(out["en"], out["zh"]) for c in pair]  # interleaved: en, zh, en, ...


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--held-out", action="store_true", help="the held-out set the benchmark evaluates on")
    args = ap.parse_args()
    out = args.out or Path(__file__).resolve().parents[1] / "qwenquant/data/calibration/chat.jsonl"
    convs = build(args.shared, args.held_out)
    out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    thinking = sum(c["thinking"] for c in convs)
    tasks = {t: sum(c["task"] == t for c in convs) for t in sorted({c["task"] for c in convs})}
    print(f"wrote {out}: {len(convs)} conversations, {thinking} thinking, {len(convs) - thinking} non-thinking, "
          f"tasks {tasks}; sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
