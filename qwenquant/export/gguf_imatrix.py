"""The importance matrix llama.cpp's K-quant quantizer takes, computed from qwenquant's calibration activations.

For every decoder Linear with input x [T, K] over all T calibration tokens, the importance of input column k is

    I[k] = (1 / T) * sum_t x[t, k]^2                                   (I: [K], float32)

the statistic llama.cpp's `llama-imatrix` tool collects (`ggml` weighs each column's squared rounding error by it
when it searches block scales). Keys are the GGUF tensor names (`blk.3.attn_q.weight`), as
`llama_model_quantize` looks them up; tensors without an entry (the embedding table) are quantized unweighted.
"""

from __future__ import annotations

import torch

from qwenquant.export.gguf_meta import gguf_module


def column_mean_squares(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over tokens of x^2 per column [K] in float32, token count T) for x [..., K]."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return (flat * flat).sum(0), int(flat.shape[0])


@torch.no_grad()
def importance_matrix(model, calib: torch.Tensor, layers_path: str = "model.layers") -> dict[str, torch.Tensor]:
    """{GGUF tensor name: I [K]} (module docstring) from `model` (float32 on CPU) run on `calib` [S, L] token ids,
    one sample per forward."""
    gguf = gguf_module()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, int(model.config.num_hidden_layers))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(layers_path + "."):
            target = names.get_name(name + ".weight", try_suffixes=(".weight",))
            if target is None:
                raise ValueError(f"no GGUF name for {name}")

            def hook(_m, inputs, _out, target=target):
                s, n = column_mean_squares(inputs[0])
                sums[target] = sums[target] + s if target in sums else s
                counts[target] = counts.get(target, 0) + n

            hooks.append(mod.register_forward_hook(hook))
    try:
        for row in calib:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: sums[k] / counts[k] for k in sums}
