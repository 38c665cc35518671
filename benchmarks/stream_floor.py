"""The floor a data-free FP8 quantizer is measured against (benchmarks/real_sizes.py): read each tensor of each
source shard, apply the FP8 arithmetic to the decoder Linear weights, write the shard. Nothing else: no checks, no
config, no verification; a whole shard is held in memory.

    python benchmarks/stream_floor.py SRC DST channel|block
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def fp8(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    if scheme == "channel":
        scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12).to(torch.bfloat16)
        return (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn), scale
    n, k = w.shape  # 128x128 blocks (Qwen3's dimensions are multiples of 128)
    blocks = w.view(n // 128, 128, k // 128, 128)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12).to(torch.bfloat16)
    q = (blocks / scale.float()[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(n, k), scale


def main(src: Path, dst: Path, scheme: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                if LINEAR.match(key):
                    out[key], out[key[: -len("weight")] + "weight_scale"] = fp8(t, scheme)
                else:
                    out[key] = t
        save_file(out, str(dst / f.name))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
