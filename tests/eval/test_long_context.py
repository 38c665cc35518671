"""Long-context evaluation: the passkey generator and its scoring, the window sweep against plain perplexity, the
FP8 KV cache's effect, and the bad-input error for a context beyond the model's max positions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qwenquant.errors import BadInputError
from qwenquant.eval import passkey
from qwenquant.eval.long_context import (articles, check_lengths, long_documents, make_static_cache, window_sweep)
from qwenquant.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def tokenizer(mini_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mini_model)


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def haystack(tokenizer, eval_text):
    return tokenizer(eval_text.read_text(), add_special_tokens=False)["input_ids"]


def test_passkey_prompts_deterministic_and_needle_at_depth(tokenizer, haystack):
    args = (tokenizer, haystack, [128, 256], [0.1, 0.5, 0.9], 3, 7)
    prompts = passkey.build_prompts(*args)
    again = passkey.build_prompts(*args)
    assert [p.ids for p in prompts] == [p.ids for p in again] and len(prompts) == 2 * 3 * 3
    other_seed = passkey.build_prompts(tokenizer, haystack, [128, 256], [0.1, 0.5, 0.9], 3, 8)
    assert [p.key for p in other_seed] != [p.key for p in prompts]
    question = tokenizer(passkey.QUESTION, add_special_tokens=False)["input_ids"]
    for p in prompts:
        assert len(p.ids) == p.length
        assert p.ids[p.needle_start:p.needle_start + len(p.needle)] == p.needle
        assert tokenizer.decode(p.needle).strip() == passkey.NEEDLE.format(key=p.key).strip()
        h = p.length - len(p.needle) - len(question)
        assert p.needle_start == round(p.depth * h)  # the stated depth, in haystack tokens before the needle
        assert p.ids[-len(question):] == question
        keys = [tokenizer.decode(c).strip() for c in p.candidates]
        assert keys[0] == p.key and len(set(keys)) == len(keys) == passkey.DEFAULT_CANDIDATES
        assert len({len(c) for c in p.candidates}) == 1  # log-likelihoods over equally many tokens
    by_trial = {}
    for p in prompts:  # every depth of one (length, trial) hides the same key in the same haystack
        by_trial.setdefault((p.length, p.trial), set()).add(p.key)
    assert all(len(keys) == 1 for keys in by_trial.values())


def test_passkey_score_matches_full_forwards(tokenizer, haystack, tiny_model):
    """The cached, teacher-forced scoring equals scoring each candidate with its own full forward (no cache), and
    `exact` equals greedy generation."""
    p = passkey.build_prompts(tokenizer, haystack, [96], [0.5], 1, 0, candidates=4)[0]
    dev = torch.device("cpu")
    score = passkey.score_prompt(tiny_model, p, dev, lambda n: make_static_cache(tiny_model.config, n, "bf16"))
    logps = []
    with torch.no_grad():
        for cand in p.candidates:
            ids = torch.tensor([p.ids + cand])
            logp = F.log_softmax(tiny_model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            logps.append(float(sum(logp[len(p.ids) - 1 + i, t] for i, t in enumerate(cand))))
        greedy = tiny_model.generate(torch.tensor([p.ids]), max_new_tokens=len(p.answer), do_sample=False,
                                     pad_token_id=0)[0, len(p.ids):].tolist()
    assert score["logp"] == pytest.approx(logps[0], abs=1e-3)
    assert score["rank"] == sum(lp > logps[0] for lp in logps[1:])
    assert score["exact"] == (greedy == p.answer)


def test_passkey_summary_counts():
    prompts = [passkey.PasskeyPrompt(64, d, t, "12345", [], 0, [], [[1], [2]]) for d in (0.1, 0.9) for t in (0, 1)]
    scores = [{"exact": e, "rank": r, "logp": -1.0, "candidates": 2} for e, r in
              ((True, 0), (False, 1), (False, 0), (False, 1))]
    s = passkey.summarize(prompts, scores)
    assert s["overall"] == {"n": 4, "exact": 0.25, "top1": 0.5, "mean_rank": 0.5, "mean_logp": -1.0}
    assert [c["top1"] for c in s["cells"]] == [0.5, 0.5] and s["chance_top1"] == 0.5


def test_window_sweep_equals_plain_perplexity(tokenizer, tiny_model, eval_text):
    text = eval_text.read_text()
    docs = long_documents(tokenizer, text, 256, 2)
    dev = torch.device("cpu")
    sweep = window_sweep(tiny_model, docs, [64, 128, 256], dev)
    for w in (64, 128, 256):
        plain = perplexity(tiny_model, docs.reshape(-1, w), dev)
        assert sweep[str(w)]["perplexity"] == plain.perplexity and sweep[str(w)]["tokens"] == plain.tokens
    assert len(sweep["by_position"]) == 8 and sweep["by_position"][-1]["to"] == 255
    mean_nll = sum(b["mean_nll"] * (b["to"] - b["from"] + 1) for b in sweep["by_position"]) / 255
    assert mean_nll == pytest.approx(sweep["256"]["mean_nll"], rel=1e-5)
    fp8 = window_sweep(tiny_model, docs, [128, 256], dev, kv_cache="fp8")
    change = abs(fp8["256"]["mean_nll"] / sweep["256"]["mean_nll"] - 1)
    print(f"fp8 KV cache relative NLL change {change:.2e}")
    assert 0 < change < 0.01  # the cache is quantized (not a no-op) and e4m3 moves the NLL by well under 1%


def test_long_documents_start_at_articles(tokenizer):
    text = "\n\n".join([" = A = ", " one two three four five six seven eight nine ten " * 20, " = B = ",
                        " eleven twelve " * 50])
    assert len(articles(text)) == 2
    docs = long_documents(tokenizer, text, 64, 40)
    first = tokenizer("\n\n".join(text.split("\n\n")[:2]), add_special_tokens=False)["input_ids"]
    n_a = len(first) // 64  # article A's documents, then B's, the first of them at B's heading
    assert docs.shape[1] == 64 and n_a >= 2 and torch.equal(docs[0], torch.tensor(first[:64]))
    assert tokenizer.decode(docs[n_a][:4]).startswith(" = B =")
    assert long_documents(tokenizer, text, 64, 3).shape == (3, 64)
    with pytest.raises(BadInputError, match="fewer than 100000 tokens"):
        long_documents(tokenizer, text, 100000, 1)


def test_check_lengths_names_the_fix():
    plain = {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    check_lengths([512, 4096], plain)
    with pytest.raises(BadInputError, match=r"8192 tokens exceed the model's max_position_embeddings 4096 \(rope "
                                            r"default\); extend it with YaRN .*factor 2, original_max_position"):
        check_lengths([4096, 8192], plain)
    yarn = {"max_position_embeddings": 8192, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
    check_lengths([8192], yarn)
    with pytest.raises(BadInputError, match="YaRN factor 2.0 allows 8192"):
        check_lengths([16384], yarn)


def test_cli_refuses_context_beyond_max_positions(cli, tiny_qwen3, eval_text, tmp_path):
    out = tmp_path / "report"
    res = cli(["eval", tiny_qwen3, "--tasks", "none", "--no-ppl", "--long-context", "--context-lengths", "256,1024",
               "--eval-text", eval_text, "--device", "cpu", "--out", out])
    assert res.code == 2, res.err
    assert len(res.error_lines) == 1 and "max_position_embeddings 512" in res.err and "YaRN" in res.err
    assert not out.exists()


def test_cli_long_context_report(cli, tiny_qwen3, eval_text, tmp_path):
    out = tmp_path / "report"
    res = cli(["eval", tiny_qwen3, "--baseline", tiny_qwen3, "--tasks", "none", "--no-ppl", "--long-context",
               "--context-lengths", "64,128", "--long-docs", "2", "--passkey-trials", "1", "--passkey-depths", "50",
               "--kv-cache", "bf16,fp8", "--eval-text", eval_text, "--device", "cpu", "--out", out, "--json"])
    assert res.code == 0, res.err
    summary = json.loads(res.out)["long_context"]
    assert set(summary) == {"bf16", "fp8"}
    assert summary["bf16"]["perplexity"] == summary["bf16"]["baseline_perplexity"]  # same folder, same numbers
    report = json.loads((out / "eval_report.json").read_text())["long_context"]
    assert report["model"]["documents"] == 2 and report["settings"]["lengths"] == [64, 128]
    assert "## Long context" in (out / "EVAL.md").read_text()


def test_cli_long_context_reads_calibrated_kv_scales(cli, fp8_run, tiny_qwen3, eval_text, tmp_path):
    """A checkpoint made with --kv-cache fp8 runs the FP8 cache with its own calibrated scales, not the prefill's."""
    run = fp8_run("--kv-cache", "fp8")
    assert run.code == 0, run.err
    from qwenquant.eval.long_context import checkpoint_kv_scales

    scales = checkpoint_kv_scales(run.out_dir)
    assert sorted(scales) == [0, 1] and all(k.dtype == torch.float32 for k, _ in scales.values())
    out = tmp_path / "report"
    res = cli(["eval", run.out_dir, "--tasks", "none", "--no-ppl", "--long-context", "--context-lengths", "128",
               "--long-docs", "1", "--passkey-trials", "0", "--kv-cache", "fp8", "--eval-text", eval_text,
               "--device", "cpu", "--out", out, "--quiet"])
    assert res.code == 0, res.err
    report = json.loads((out / "eval_report.json").read_text())["long_context"]
    assert report["settings"]["kv_scales"] == "calibrated (checkpoint)"
