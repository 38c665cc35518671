"""What a run's report (qwenquant_report.json, REPORT.md) and model card (README.md) say about the evaluation:
windows, window length, predicted tokens, the whole text or a prefix of how many windows, the compute dtype."""

from __future__ import annotations

import json


def _read(res) -> tuple[dict, str, str]:
    assert res.code == 0, res.err[-3000:]
    out = res.out_dir
    return (json.loads((out / "qwenquant_report.json").read_text()), (out / "REPORT.md").read_text(),
            (out / "README.md").read_text())


def test_a_prefix_of_the_text_is_stated_as_one(fp8_run) -> None:
    report, md, card = _read(fp8_run())  # --eval-windows 1 --eval-window 128 on ~5 windows of text
    ev = report["evaluation"]
    assert (ev["windows"], ev["window"], ev["ppl_tokens"], ev["whole_text"]) == (1, 128, 127, False)
    assert ev["text_windows"] > 1 and ev["compute_dtype"] == "float32"
    assert ev["source"]["tokens"] == ev["quantized"]["tokens"] == ev["ppl_tokens"]
    said = (f"1 non-overlapping window of 128 tokens (127 predicted tokens), the first 1 of its {ev['text_windows']} "
            "windows, not the whole text (`--eval-windows all`); computed in float32")
    assert said in md and said in card


def test_the_whole_text_is_stated_as_such(fp8_run) -> None:
    report, md, card = _read(fp8_run("--eval-windows", "all"))
    ev = report["evaluation"]
    assert ev["whole_text"] is True and ev["windows"] == ev["text_windows"] > 1
    said = (f"{ev['windows']} non-overlapping windows of 128 tokens ({ev['ppl_tokens']:,} predicted tokens), "
            "the whole text")
    assert said in md and said in card
