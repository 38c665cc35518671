"""Batched lm-eval log-likelihoods (qwenquant/eval/loglikelihood.py) equal lm-eval's own one-request-at-a-time path
(HFLM, batch size 1) within float noise: per request on the tiny model (shared contexts, one-token continuations,
duplicates, a request longer than the model's context), and task accuracies on qwen3-mini."""

from __future__ import annotations

import pytest
import torch

from qwenquant.eval.loglikelihood import BatchedLM, token_batches
from qwenquant.eval.precision import evaluation_precision

CPU = torch.device("cpu")


def test_token_batches_respect_both_caps() -> None:
    lengths = [100, 90, 90, 50, 50, 50, 50, 10, 10, 3]
    batches = token_batches(lengths, max_tokens=200, max_rows=3)
    assert [list(b) for b in batches] == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * lengths[b.start] <= 200)
    assert [list(b) for b in token_batches([500, 4], 100, 8)] == [[0], [1]]  # too long for the budget: alone
    assert token_batches([], 100, 8) == []


def _requests(vocab: int, max_length: int) -> list:
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    reqs = []
    for n_ctx in (5, 17, 40, 63):
        ctx = toks(n_ctx)
        reqs += [(("c", f"{n_ctx}-{k}"), ctx, toks(k)) for k in (1, 1, 3, 9)]  # shared context, one-token choices
    reqs.append((None, toks(max_length + 20), toks(4)))  # truncated from the left, as lm-eval does
    reqs.append(reqs[2])  # a duplicate
    reqs.append((("c", "short"), toks(1), toks(1)))
    return reqs


def test_batched_equals_one_request_at_a_time(tiny_qwen3) -> None:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    with evaluation_precision(model, CPU):
        batched = BatchedLM(pretrained=model, tokenizer=tokenizer, batch_size=4, softmax_dtype=torch.float32,
                            max_batch_tokens=4096)
        single = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, softmax_dtype=torch.float32,
                      logits_cache=False)
        requests = _requests(model.config.vocab_size, batched.max_length)
        calls = []
        handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
        ours = batched._loglikelihood_tokens(requests, disable_tqdm=True)
        handle.remove()
        theirs = single._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(ours) == len(theirs) == len(requests)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4, rel=1e-5) and greedy_a == greedy_b
    assert ours[2] == ours[-2]  # the duplicate
    distinct = len({tuple((c + k)[-(batched.max_length + 1):][:-1]) for _key, c, k in requests})
    assert sum(s[0] for s in calls) == distinct < len(requests)  # each distinct input once
    assert len(calls) < distinct  # in batches


@pytest.mark.slow
def test_task_accuracies_equal_the_unbatched_path_on_qwen3_mini(mini_model, shared_dir) -> None:
    """lm-eval's HFLM, one request per forward, in float32 too: the reference the batched path must reproduce."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenquant.eval import tasks as T

    tasks_dir = shared_dir / "data" / "tasks"
    if not tasks_dir.is_dir():
        pytest.skip(f"task data not found at {tasks_dir}")
    model = AutoModelForCausalLM.from_pretrained(mini_model, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(mini_model)
    plan = T.resolve_tasks(None, tasks_dir=tasks_dir)
    ours = T.run_tasks(model, tokenizer, plan, limit=8)
    with T._quiet_lm_eval(True), evaluation_precision(model, CPU):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, softmax_dtype=torch.float32,
                  logits_cache=False)
        results = simple_evaluate(model=lm, tasks=[plan.lm_names[n] for n in plan.names], limit=8,
                                  task_manager=plan.task_manager, log_samples=False, bootstrap_iters=0)
    for name in plan.names:
        theirs = T._metrics(results, plan.lm_names[name])
        assert (ours[name]["acc"], ours[name]["acc_norm"], ours[name]["n"]) == (
            theirs["acc"], theirs["acc_norm"], theirs["n"]), name
