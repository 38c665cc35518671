"""Shape-true Qwen3 checkpoints with random weights, for memory and speed benchmarks.

Shapes come from the Qwen3 dense configs in ../shared/docs/formats.md (all: head_dim 128, vocab 151936, GQA, no
attention bias, tied embeddings up to 4B). Throughput and memory depend on shapes only; accuracy numbers from these
models mean nothing. The tokenizer is qwen3-mini's (8192 ids, all valid rows of the 151936-row embedding), so
evaluation and calibration text tokenize exactly as they do for qwen3-mini.

    from random_models import build_random_qwen3
    path = build_random_qwen3("0.6b", "/tmp/qq-models")            # cached: built once per spec
    path = build_random_qwen3("1.7b:layers=8", "/tmp/qq-models")   # the 1.7B shapes, 8 decoder layers
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

MINI = Path("/work/shared/models/qwen3-mini")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# hidden, layers, heads, kv heads, intermediate, tied (../shared/docs/formats.md)
PRESETS: dict[str, dict] = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=3072, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=6144, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=9728, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=12288, tie_word_embeddings=False),
}
COMMON = dict(head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
              bos_token_id=0, eos_token_id=2, pad_token_id=0)


def parse_spec(spec: str) -> tuple[str, dict]:
    """`1.7b:layers=8,vocab=32768` -> ("1.7b", config overrides). Keys: layers, vocab, or any Qwen3Config field."""
    name, _, rest = spec.partition(":")
    if name.lower() not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        key = {"layers": "num_hidden_layers", "vocab": "vocab_size"}.get(key, key)
        overrides[key] = json.loads(value) if value not in ("", None) else True
    return name.lower(), overrides


def spec_dirname(spec: str) -> str:
    return "qwen3-" + spec.lower().replace(":", "-").replace(",", "-").replace("=", "")


def config_for(spec: str) -> dict:
    name, overrides = parse_spec(spec)
    return COMMON | PRESETS[name] | overrides


def build_random_qwen3(spec: str, root: str | Path, seed: int = 0, tokenizer_src: Path = MINI,
                       fill_device: str = "cpu") -> Path:
    """Build (or reuse) `<root>/<spec dir>`: a random bf16 Qwen3ForCausalLM with `spec`'s shapes.

    Weights are N(0, 0.02) like Qwen's initializer, norms uniform in [0.5, 1.5]; filled in place on an
    uninitialised model (transformers' own init would take minutes at these sizes), on `fill_device` with its own
    generator seeded `seed` ("cuda": seconds instead of minutes for 4B; other bytes than a CPU fill). A finished
    folder has `.complete`; anything else in its place is rebuilt.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(root) / spec_dirname(spec)
    if (folder / ".complete").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    cfg = Qwen3Config(**config_for(spec))
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device=fill_device).to(torch.bfloat16)
    gen = torch.Generator(device=fill_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq) are uninitialised after to_empty, but they are not saved
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        if (tokenizer_src / f).exists():
            shutil.copy(tokenizer_src / f, folder / f)
    (folder / ".complete").write_text(spec + "\n")
    n = sum(p.numel() for p in model.parameters())
    print(f"built {folder} ({n / 1e9:.3f}B parameters) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return folder


def build_random_qwen3_sharded(spec: str, root: str | Path, seed: int = 0, shard_gb: float = 4.0,
                               workers: int = 2) -> Path:
    """Like `build_random_qwen3`, for sizes that must not be held in memory (8B is 16 GB in bf16): tensors are
    generated one at a time on `workers` threads (tensor i from seed + i, so the bytes do not depend on timing) and
    written into `shard_gb` shards laid out up front, named and indexed as hub checkpoints are. A separate folder
    (`<spec dir>-sharded`) so the in-memory builder's checkpoints stay as they are."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwenquant.stream.shards import ShardLayout

    folder = Path(root) / (spec_dirname(spec) + "-sharded")
    if (folder / ".complete").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    cfg = Qwen3Config(**config_for(spec))
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    tensors = [(n, p.dtype, tuple(p.shape)) for n, p in model.state_dict().items()
               if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    folder.mkdir(parents=True)
    layout = ShardLayout(tensors, int(shard_gb * 2**30))
    layout.create(folder)

    def fill(i: int, name: str, shape: tuple[int, ...]) -> None:
        gen = torch.Generator().manual_seed(seed + i)
        rows = shape[0]
        step = max(1, (64 * 2**20) // max(1, 4 * (math.prod(shape) // rows)))
        for start in range(0, rows, step):
            part = torch.empty((min(rows, start + step) - start, *shape[1:]))
            if name.endswith("norm.weight"):
                part.uniform_(0.5, 1.5, generator=gen)
            else:
                part.normal_(0.0, 0.02, generator=gen)
            row_bytes = 2 * (math.prod(shape) // rows)
            layout.write(name, part.to(torch.bfloat16), at=start * row_bytes)

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(fill, i, n, s) for i, (n, _, s) in enumerate(tensors)]:
            f.result()
    layout.finish()
    cfg.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["architectures"] = ["Qwen3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (MINI / f).exists():
            shutil.copy(MINI / f, folder / f)
    (folder / ".complete").write_text(spec + "\n")
    n = sum(math.prod(s) for _, _, s in tensors)
    print(f"built {folder} ({n / 1e9:.3f}B parameters, {weight_bytes(folder) / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t:.1f}s", file=sys.stderr)
    return folder


def weight_bytes(folder: Path) -> int:
    """Bytes of the safetensors files of a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build shape-true random Qwen3 checkpoints")
    ap.add_argument("specs", nargs="+", help="e.g. 0.6b  1.7b:layers=8")
    ap.add_argument("--root", default="/tmp/qq-models")
    a = ap.parse_args()
    for s in a.specs:
        print(build_random_qwen3(s, a.root))
