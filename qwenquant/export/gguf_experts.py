"""Qwen3-MoE experts in GGUF: llama.cpp's `qwen3moe` stores each sparse layer's experts stacked, one tensor per
projection, and the router as `ffn_gate_inp`:

| qwenquant / on-disk name                                  | GGUF tensor               | shape (numpy order)  |
|-----------------------------------------------------------|---------------------------|----------------------|
| model.layers.L.mlp.experts.E.gate_proj.weight, E = 0..n-1 | blk.L.ffn_gate_exps.weight | [n_expert, I, H]    |
| model.layers.L.mlp.experts.E.up_proj.weight               | blk.L.ffn_up_exps.weight   | [n_expert, I, H]    |
| model.layers.L.mlp.experts.E.down_proj.weight             | blk.L.ffn_down_exps.weight | [n_expert, H, I]    |
| model.layers.L.mlp.gate.weight (router)                   | blk.L.ffn_gate_inp.weight  | [n_expert, H]       |

Expert e is slice e of the stacked tensor (as llama.cpp's converter stacks them). A quantized expert's block bytes
are stacked as they are, so every expert of one projection must have the same GGUF type (one tensor, one type).
"""

from __future__ import annotations

import re

import numpy as np

EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)(?P<suffix>\.weight)?$")


def expert_slot(name: str) -> tuple[str, int] | None:
    """(the stacked tensor's HF-style key `...mlp.experts.gate_proj.weight`, expert index) of one expert's Linear
    or weight name; None for anything else."""
    m = EXPERT.match(name)
    return (f"{m['prefix']}.{m['proj']}.weight", int(m["e"])) if m else None


class ExpertStacker:
    """Collects each expert's (bytes [N, row bytes], GGUF type) and hands back a projection's stacked tensor once
    all `n_experts` have arrived."""

    def __init__(self, n_experts: int):
        self.n = int(n_experts)
        self.pending: dict[str, dict[int, tuple[np.ndarray, str]]] = {}

    def add(self, key: str, data: np.ndarray, qtype: str) -> tuple[str, np.ndarray, str] | None:
        """(stacked key, bytes [n_experts, N, row bytes], type) when `key` completes its projection, else None."""
        stacked, e = expert_slot(key)
        slots = self.pending.setdefault(stacked, {})
        slots[e] = (data, qtype)
        if len(slots) < self.n:
            return None
        del self.pending[stacked]
        types = {t for _, t in slots.values()}
        if len(types) != 1:
            raise ValueError(f"{stacked}: GGUF stacks all experts of a projection in one tensor of one type, but "
                             f"these experts have {sorted(types)}; quantize every expert alike (no --keep-sensitive "
                             "on single experts)")
        return stacked, np.stack([slots[i][0] for i in range(self.n)]), types.pop()

    def check_complete(self) -> None:
        if self.pending:
            key, slots = next(iter(self.pending.items()))
            raise ValueError(f"{key}: {len(slots)} of {self.n} experts found; GGUF needs every expert")
