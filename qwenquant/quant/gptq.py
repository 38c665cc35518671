"""GPTQ (Frantar et al., 2022) as pure tensor functions, in the paper's symbols.

Minimise ||W X - W_hat X||^2 one column at a time with H = 2 X X^T / n (here X is [T, K], so H = 2 X^T X / n,
accumulated over calibration batches as a float64 sum S = sum_b X_b^T X_b and rounded to float32 once, just before
the solve: `accumulate_hessian_sum`, `hessian_from_sum`):
quantize column k, then spread its error over the columns not yet quantized,
    err = (w_k - q_k) / [Hinv]_kk,    W[:, k+1:] -= err [Hinv]_{k, k+1:},
where Hinv is the upper Cholesky factor of (H + lambda I)^-1, lambda = dampening_frac * mean(diag H).
Column blocks of `block_size` defer the update of later columns (lazy batch updates).
Act-order quantizes columns by descending diag(H): "group" forms groups in that order (g_idx needed),
"static" keeps natural groups k // G with qparams computed up front (no g_idx in the checkpoint).
The grid is the INT grid of `GPTQConfig` unless a `ColumnGrid` is given (NVFP4: quant/nvfp4.py `gptq_grid`): the
same loop then asks it for each group's parameters, each column's rounding and the final record.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from qwenquant.quant.intq import (
    check_bits,
    compute_group_qparams,
    compute_qparams,
    make_int_record,
    quantize_codes,
    quantize_rtn,
    resolve_group_size,
)
from qwenquant.quant.errors import NonFiniteError
from qwenquant.quant.records import QuantizedWeight

ACTORDERS = ("none", "static", "group")
CHOLESKY_RETRIES = 3  # each retry multiplies the dampening by 10
MIN_RETRY_DAMPENING_FRAC = 1e-4  # retry base when dampening_frac is 0
HESSIAN_PANEL = 128  # rows of X^T X per matmul in accumulate_hessian_sum (and of S per division)


@dataclass
class GPTQConfig:
    """GPTQ settings for one Linear: INT grid, act-order mode, dampening and lazy-update block width."""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = True
    actorder: str = "none"  # none | static | group
    dampening_frac: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per-channel), got {self.group_size}")
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder must be one of {ACTORDERS}, got {self.actorder!r}")
        if not (self.dampening_frac >= 0 and math.isfinite(self.dampening_frac)):
            raise ValueError(f"dampening_frac must be a finite number >= 0, got {self.dampening_frac}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass(frozen=True)
class ColumnGrid:
    """A grid other than INT for the column loop, as pure functions (the group size is the grid's own):
    - `qparams(w [..., G]) -> (scale, zero)` each [..., 1] float32: a group's parameters from its weights;
    - `fake(w, scale, zero) -> w_hat` float32 (broadcast): the rounding of weights under those parameters;
    - `record(pre [N, K], scale [N, K/G], zero [N, K/G]) -> QuantizedWeight`: the record of the pre-rounding
      weights (natural column order) under the groups' parameters, whose dequantization equals `fake` of them;
    - `rtn(W [N, K]) -> QuantizedWeight`: round-to-nearest, when no dampening makes H positive definite."""

    group_size: int
    qparams: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    fake: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    record: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], QuantizedWeight]
    rtn: Callable[[torch.Tensor], QuantizedWeight]


@torch.no_grad()
def accumulate_hessian_sum(S: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """S + X_b^T X_b [K, K] float64 for one batch x [..., K] (X_b its rows as [T, K] float32); S None starts at 0.

    The batch's product is a float32 matmul, each entry the same dot product over the batch's tokens; it is added
    to the float64 sum exactly (float32 -> float64 is exact). X_b^T X_b is symmetric, so only its upper triangle is
    multiplied out, in row panels of HESSIAN_PANEL rows (X_p^T X[:, p0:] for panel p = [p0, p1)), and mirrored:
    ~(1/2 + panel / 2K) of the full product's flops. Returns a new tensor (S is not changed)."""
    x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
    k = x.shape[1]
    S = torch.zeros(k, k, dtype=torch.float64, device=x.device) if S is None else S.clone()
    if x.shape[0] == 0:
        return S
    for p0 in range(0, k, HESSIAN_PANEL):
        p1 = min(p0 + HESSIAN_PANEL, k)
        panel = x[:, p0:p1].T @ x[:, p0:]  # [p1 - p0, K - p0] float32: rows p0..p1 of X_b^T X_b from the diagonal on
        S[p0:p1, p0:] += panel
        S[p1:, p0:p1] += panel[:, p1 - p0 :].T  # the mirror below the diagonal block
    return S


@torch.no_grad()
def hessian_from_sum(S: torch.Tensor, n: int) -> torch.Tensor:
    """H = 2 S / n [K, K] float32 from the float64 sum S = sum_b X_b^T X_b over n tokens, rounded to float32 once
    (computed as S / (n / 2) in float64, which is exactly 2 S / n correctly rounded; then to float32), one row panel
    at a time so the float64 temporary stays [HESSIAN_PANEL, K]. n = 0 (no tokens) gives zeros.

    Order independence: each entry of S is a float64 sum of float32 terms (one per batch). When the terms' magnitudes
    span less than ~2^29 (float64 has 29 more mantissa bits than float32), every partial sum is exact, so S, and H,
    do not depend on the order or grouping of the batches (one process adding batch after batch, or ranks adding
    their own batches and then all-reducing the partial sums). Otherwise a partial sum rounds at 2^-53 relative,
    and H's float32 rounding can differ only if 2 S / n lies within that distance of a float32 rounding boundary:
    about 2^-29 (~2e-9) of such entries."""
    k = S.shape[0]
    H = torch.empty(k, k, dtype=torch.float32, device=S.device)
    half_n = max(n, 1) / 2  # exact in float64 for any token count below 2^53
    for p0 in range(0, k, HESSIAN_PANEL):
        H[p0:p0 + HESSIAN_PANEL] = S[p0:p0 + HESSIAN_PANEL] / half_n
    return H


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / T [K, K] float32 of one set of inputs x [..., K] (T rows): `hessian_from_sum` of one batch."""
    return hessian_from_sum(accumulate_hessian_sum(None, x), x.reshape(-1, x.shape[-1]).shape[0])


def _factor_hinv(H: torch.Tensor, dampening_frac: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + lambda I)^-1, or None when H + lambda I is not positive definite."""
    k = H.shape[0]
    damp = dampening_frac * torch.diagonal(H).mean()
    Hd = H + damp * torch.eye(k, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item() != 0:
        return None
    Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0 or not torch.isfinite(Hinv).all() or not (torch.diagonal(Hinv) > 0).all():
        return None
    return Hinv


def _factor_hinv_with_retries(H: torch.Tensor, dampening_frac: float) -> torch.Tensor | None:
    """Try the requested dampening, then 10x, 100x, ... (warning each time); None if all fail."""
    frac = dampening_frac
    for attempt in range(CHOLESKY_RETRIES + 1):
        Hinv = _factor_hinv(H, frac)
        if Hinv is not None:
            return Hinv
        if attempt < CHOLESKY_RETRIES:
            new_frac = max(frac, MIN_RETRY_DAMPENING_FRAC) * 10
            warnings.warn(
                f"GPTQ: Cholesky failed with dampening_frac={frac:g} (Hessian not positive definite); "
                f"retrying with {new_frac:g}",
                RuntimeWarning,
                stacklevel=3,
            )
            frac = new_frac
    return None


def _aligned_block_size(block_size: int, group_size: int) -> int:
    """Block width such that each group either starts a block or lies inside one (exact group qparams)."""
    if group_size % block_size == 0 or block_size % group_size == 0:
        return block_size
    return max(block_size // group_size, 1) * group_size


def _check_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Shapes must agree and values be finite: NaN/Inf would silently poison every later column."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    k = W.shape[1]
    if tuple(H.shape) != (k, k):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight input width K={k}")
    if not torch.isfinite(W).all():
        raise NonFiniteError("GPTQ: the weight contains NaN or Inf values")
    if not torch.isfinite(H).all():
        raise NonFiniteError("GPTQ: the Hessian contains NaN or Inf values (check the calibration activations)")


@torch.no_grad()
def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    config: GPTQConfig,
    scale_dtype: torch.dtype = torch.bfloat16,
    clip_ratio: float = 1.0,
) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize W [N, K] given H [K, K]; returns the record and the loss sum_k (w_k - q_k)^2 / (2 [Hinv]_kk^2).

    The record's q is in original column order and dequantizes exactly to GPTQ's final weight.
    On Cholesky failure after retries it warns and falls back to RTN (loss = 1/2 sum_k max(H_kk, 0) ||E_:k||^2).
    """
    result = _quantize_rows(W, H, config, scale_dtype, clip_ratio)
    return result.record, float(result.loss.sum())


@dataclass
class GPTQResult:
    """One Linear's GPTQ outcome. `pre_rounding` [N, K] float32 holds each weight as GPTQ rounded it (after the
    error feedback of earlier columns): `record.q` is its nearest code, so rounding-tuning methods (compensation)
    can start from GPTQ's solution."""

    record: QuantizedWeight
    loss: float
    pre_rounding: torch.Tensor


@dataclass
class RowsResult:
    """The column loop's outcome for a stack of rows W [N, K]."""

    record: QuantizedWeight
    loss: torch.Tensor  # [N] per output row
    pre_rounding: torch.Tensor  # [N, K]


@torch.no_grad()
def quantize_weights_shared(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    config: GPTQConfig,
    scale_dtype: torch.dtype = torch.bfloat16,
    clip_ratios: list[float] | None = None,
    grid: ColumnGrid | None = None,
) -> list[GPTQResult]:
    """GPTQ for several Linears reading the same input (one H), e.g. q/k/v: rows are independent in GPTQ, so
    quantizing the stacked rows once gives each Linear exactly its own result, with one column loop instead of many.
    `grid`: a non-INT grid (then `clip_ratios` must be None)."""
    W, clip = stack_rows(Ws, clip_ratios, grid)
    clip = clip.to(H.device) if isinstance(clip, torch.Tensor) else clip
    return split_shared(Ws, _quantize_rows(W, H, config, scale_dtype, clip, grid))


def stack_rows(Ws: list[torch.Tensor], clip_ratios: list[float] | None = None, grid: ColumnGrid | None = None
               ) -> tuple[torch.Tensor, float | torch.Tensor]:
    """The Linears' rows stacked, W [sum N_i, K] float32, and the clip ratio: a float, or per row [sum N_i, 1]
    (one ratio per Linear) when they differ from 1."""
    clip: float | torch.Tensor = 1.0
    if clip_ratios is not None and any(r != 1.0 for r in clip_ratios):  # one ratio per Linear -> per row [N, 1]
        clip = torch.cat([torch.full((w.shape[0], 1), float(r)) for w, r in zip(Ws, clip_ratios)])
    if grid is not None and not isinstance(clip, float):
        raise ValueError("GPTQ: clip ratios apply to the INT grid only")
    return torch.cat([w.detach().float() for w in Ws]), clip


def quantize_rows(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig, scale_dtype: torch.dtype,
                  clip_ratio: float | torch.Tensor = 1.0, grid: ColumnGrid | None = None) -> RowsResult:
    """The GPTQ column loop on rows W [N, K] with H [K, K] (see `_quantize_rows`): every row is solved on its
    own, so any subset of a Linear's rows gives those rows' part of the whole result (weight-parallel GPTQ)."""
    return _quantize_rows(W, H, config, scale_dtype, clip_ratio, grid)


def split_shared(Ws: list[torch.Tensor], res: RowsResult) -> list[GPTQResult]:
    """The stacked rows' result `res` cut back into one GPTQResult per Linear of `Ws` (in order)."""
    out, start = [], 0
    for w in Ws:
        rows = slice(start, start + w.shape[0])
        out.append(GPTQResult(split_rows(res.record, rows), float(res.loss[rows].sum()), res.pre_rounding[rows]))
        start += w.shape[0]
    return out


def split_rows(record: QuantizedWeight, rows: slice) -> QuantizedWeight:
    """The record of output rows `rows` (codes, scales and zero points are per row; g_idx is per column)."""
    from dataclasses import replace

    zp = record.zero_point[rows].clone() if record.zero_point is not None else None  # (nvfp4: global_scale shared)
    return replace(record, q=record.q[rows].clone(), scale=record.scale[rows].clone(), zero_point=zp,
                   g_idx=record.g_idx.clone() if record.g_idx is not None else None)


def _quantize_rows(
    W: torch.Tensor, H: torch.Tensor, config: GPTQConfig, scale_dtype: torch.dtype,
    clip_ratio: float | torch.Tensor = 1.0, grid: ColumnGrid | None = None,
) -> RowsResult:
    """The GPTQ column loop on W [N, K] with H [K, K]; returns the record, the loss of each output row [N] and the
    pre-rounding weights [N, K]. `clip_ratio` (float or per-row [N, 1]) shrinks every group's range before its scale
    is computed. Per column k in quantization order, with w the column as earlier errors left it [N]:
        q = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z),   e = (w - q) / [Hinv]_kk,
        W[:, j] -= e [Hinv]_kj  for the later columns j of the block (the later blocks: one matmul per block).
    With a `grid`, its `qparams` / `fake` / `record` replace the INT formulas (q = grid.fake(w, s, z))."""
    _check_inputs(W, H)
    n, K = W.shape
    G = resolve_group_size(K, grid.group_size if grid is not None else config.group_size)
    bits, sym = config.bits, config.symmetric
    W, H, static_params, perm = _prepare(W, H, config, G, scale_dtype, clip_ratio, grid)

    Hinv = _factor_hinv_with_retries(H, config.dampening_frac)
    if Hinv is None:
        return _fallback_rtn(W, H, perm, config, scale_dtype, clip_ratio, grid)

    codes = torch.empty(n, K, dtype=torch.int32, device=W.device)  # quantization order
    n_groups = K // G
    scale = torch.zeros(n, n_groups, dtype=torch.float32, device=W.device)
    zero = torch.zeros_like(scale)
    losses = torch.zeros(n, dtype=torch.float32, device=W.device)
    pre = torch.empty_like(W)  # quantization order
    B = _aligned_block_size(config.block_size, G)
    natural_group = torch.arange(K, device=W.device) // G
    col_group = natural_group if perm is None or static_params is None else natural_group[perm]
    qmax = 2**bits - 1

    # In-block state is kept transposed ([b, N]: one contiguous row per column), so each column's update of the later
    # columns is a wide contiguous outer product; every element sees the same float32 operations as in [N, b].
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        b = i2 - i1
        W1 = W[:, i1:i2].T.contiguous()  # [b, N], receives in-block updates
        Err1 = torch.empty_like(W1)  # [b, N]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)
        # each column's group params [b, N]: static ones gathered once; dynamic ones filled where a group starts
        params = static_params if static_params is not None else (scale, zero)
        idx = col_group[i1:i2]
        S1, Z1 = params[0][:, idx].T.contiguous(), params[1][:, idx].T.contiguous()
        for i in range(b):
            col = i1 + i
            if static_params is None and col % G == 0:
                # group starts here: params from the weight as updated by all earlier columns
                cur = W1[i : i + G].T if i + G <= b else W[:, col : col + G]
                s, z = (compute_qparams(cur, bits, sym, clip_ratio, scale_dtype) if grid is None  # [N, 1]
                        else grid.qparams(cur))
                g = col // G
                scale[:, g : g + 1], zero[:, g : g + 1] = s, z
                S1[i : i + G], Z1[i : i + G] = s.T, z.T  # to the block's end at most (groups align with blocks)
            s, z = S1[i], Z1[i]
            w = W1[i]  # [N]: column `col` as every earlier column's error left it
            if grid is None:
                q = torch.round(w / s).add_(z).clamp_(0, qmax).sub_(z).mul_(s)  # fake-quantized, as intq computes it
            else:
                q = grid.fake(w, s, z)
            err = (w - q).div_(d1[i])  # [N]
            Err1[i] = err
            W1[i + 1 :].sub_(Hinv1[i, i + 1 :, None] * err)  # column `col` is done: it keeps its pre-rounding value
        # W1 now holds each column as it was rounded: the block's codes and pre-rounding weights in one go
        W1, S1, Z1, Err1 = W1.T, S1.T, Z1.T, Err1.T.contiguous()  # back to [N, b] (Err1 in the layout it had)
        pre[:, i1:i2] = W1
        if grid is None:  # (a grid's record derives its codes from `pre` at the end)
            codes[:, i1:i2] = quantize_codes(W1, S1, Z1, bits)
        half_sq = Err1**2 / 2
        for i in range(b):  # loss in column order: sum_k (w_k - q_k)^2 / (2 [Hinv]_kk^2)
            losses += half_sq[:, i]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later blocks

    if static_params is not None:
        scale, zero = static_params
    return _finish(codes, pre, scale, zero, losses, perm, config, G, scale_dtype, grid)


def _prepare(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig, G: int, scale_dtype: torch.dtype,
             clip_ratio: float | torch.Tensor, grid: ColumnGrid | None):
    """float32 copies of W [N, K] and H [K, K] with dead inputs zeroed (any weight works for an input that is never
    active; H stays invertible), the natural groups' qparams when they are fixed up front (static act-order, or one
    group per row; else None), and the act-order permutation applied to both (None without act-order)."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n, K = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static_params = None
    if config.actorder == "static" or G == K:
        group_clip = clip_ratio.expand(n, K // G) if isinstance(clip_ratio, torch.Tensor) else clip_ratio
        static_params = (compute_group_qparams(W, config.bits, G, config.symmetric, group_clip, scale_dtype)
                         if grid is None  # [N, n_groups] x2
                         else tuple(p.squeeze(-1) for p in grid.qparams(W.view(n, K // G, G))))
    perm = None
    if config.actorder != "none":
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    return W, H, static_params, perm


def _finish(codes: torch.Tensor, pre: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, losses: torch.Tensor,
            perm: torch.Tensor | None, config: GPTQConfig, G: int, scale_dtype: torch.dtype,
            grid: ColumnGrid | None) -> RowsResult:
    """The record of the loop's codes / pre-rounding weights (quantization order) in natural column order."""
    if grid is not None:
        pre = pre if perm is None else pre[:, torch.argsort(perm)]
        return RowsResult(grid.record(pre, scale, zero), losses, pre)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        pre = pre[:, inv]
        if config.actorder == "group":
            g_idx = (torch.arange(pre.shape[1], device=pre.device) // G)[inv]  # column perm[c] sits in group c // G
    record = make_int_record(codes, scale, zero, config.bits, G, config.symmetric, scale_dtype, g_idx,
                             None if config.actorder == "none" else config.actorder)
    return RowsResult(record, losses, pre)


def _fallback_rtn(
    W: torch.Tensor, H: torch.Tensor, perm: torch.Tensor | None, config: GPTQConfig, scale_dtype: torch.dtype,
    clip_ratio: float | torch.Tensor = 1.0, grid: ColumnGrid | None = None,
) -> RowsResult:
    """RTN in natural order when no dampening makes H positive definite.

    Loss uses only diag(H), clamped at 0: the full form 1/2 tr(E H E^T) can be negative for an indefinite H.
    """
    warnings.warn(
        "GPTQ: Hessian is not positive definite even with extra dampening; falling back to round-to-nearest",
        RuntimeWarning,
        stacklevel=3,
    )
    if perm is not None:
        inv = torch.argsort(perm)
        W, H = W[:, inv], H[inv][:, inv]
    if grid is not None:
        record = grid.rtn(W)
    elif isinstance(clip_ratio, torch.Tensor):  # per row [N, 1] -> per group
        clip_ratio = clip_ratio.expand(W.shape[0], W.shape[1] // resolve_group_size(W.shape[1], config.group_size))
    if grid is None:
        record = quantize_rtn(W, config.bits, config.group_size, config.symmetric, clip_ratio, scale_dtype)
    E = W - record.dequantize()  # [N, K]
    return RowsResult(record, 0.5 * (E.pow(2) * torch.diagonal(H).clamp(min=0)).sum(dim=1), W)
