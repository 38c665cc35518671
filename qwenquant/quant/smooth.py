"""SmoothQuant-style channel-wise activation scaling, as pure tensor functions.

For a Linear y = x W^T, any positive per-input-channel factor s gives y = (x / s)(W * s)^T. Choosing
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) moves outlier magnitude from activations into weights (Xiao et al.).
1/s is folded into whatever produces x (an RMSNorm weight, or the rows of a preceding Linear), so the model
computes the same function before quantization.
"""

from __future__ import annotations

import torch

MIN_FACTOR = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] = act_absmax^alpha / w_absmax^(1-alpha), w_absmax over the columns of all balance weights."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    k = act_absmax.shape[0]
    for w in weights:
        if w.shape[1] != k:
            raise ValueError(f"weight with {w.shape[1]} input channels cannot balance {k} activation channels")
    w_absmax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=MIN_FACTOR)
    s = a.pow(alpha) / w_absmax.clamp(min=MIN_FACTOR).pow(1.0 - alpha)
    s = s.clamp(min=MIN_FACTOR)
    # channels that never fire keep factor 1 rather than an arbitrary tiny one
    return torch.where(act_absmax > 0, s, torch.ones_like(s))


def tie_over_kv_groups(s: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Reduce o_proj input factors [heads*hd] to v_proj output factors [kv_heads*hd] (GQA shares each v head).

    All query heads reading one kv head must use the same factor, so take their max.
    """
    groups = num_heads // num_kv_heads
    return s.view(num_kv_heads, groups, head_dim).amax(dim=1).reshape(-1)


def expand_kv_to_heads(s_kv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[kv_heads*hd] -> [heads*hd]: the factor each o_proj input channel sees."""
    groups = num_heads // num_kv_heads
    return s_kv.view(num_kv_heads, 1, head_dim).expand(num_kv_heads, groups, head_dim).reshape(-1)


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight / s: the norm now emits x / s."""
    return (norm_weight.float() / s).to(norm_weight.dtype)


def fold_into_output_rows(prev_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rows of the preceding Linear / s: it now emits x / s."""
    return (prev_weight.float() / s.unsqueeze(1)).to(prev_weight.dtype)


def fold_into_input_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Columns of a consuming Linear * s, compensating inputs divided by s."""
    return (weight.float() * s.unsqueeze(0)).to(weight.dtype)
