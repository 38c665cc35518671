"""INT8 W8A8 on torch._int_mm (qwenquant/kernels/int8_linear.py) against float references: exact int32 sums, the
per-token activation codes the evaluation simulates, the output against the dequantized float64 product, the CUDA
shape rules (CUDA checks skip without a GPU)."""

from __future__ import annotations

import pytest
import torch

from qwenquant.kernels import int8_linear
from qwenquant.kernels.int8_linear import Int8Linear
from qwenquant.kernels.loader import ReferenceLinear, build_linear
from qwenquant.quant import int8 as int8q
from qwenquant.quant.intq import quantize_rtn

CPU = torch.device("cpu")


def _record(n: int = 96, k: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 8  # an outlier input channel
    return int8q.quantize_weight(w.to(torch.bfloat16), torch.bfloat16)


def _acts(rows: int = 7, k: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, k, generator=g) * 2
    x[..., 10] *= 30  # an outlier channel: the per-token scale follows it
    return x.to(torch.bfloat16)


def test_int_mm_sums_are_exact_and_output_matches_float_reference() -> None:
    qw, x = _record(), _acts()
    mod = Int8Linear(qw, CPU)
    assert mod.weight.dtype == torch.int8 and "torch._int_mm" in mod.kernel_label
    y = mod(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7, 96)
    q, s = int8q.quantize_tokens(x.reshape(-1, 256))
    acc = int8_linear.int_mm_rows(q, mod.weight.t())
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), q.double() @ int8q.signed_codes(qw).double().T)  # int32 sums are exact
    # the float64 product of the simulated activations and the dequantized weight
    ref = int8q.fake_quantize_tokens(x.reshape(-1, 256).double()) @ qw.dequantize(torch.float64).T
    err = (y.reshape(-1, 96).double() - ref).abs()
    bound = 2**-8 * ref.abs() + 1e-6 * ref.abs().max()  # bf16 (8 significant bits) rounds within 2**-8 relative
    print(f"max |y - ref| / bound = {float((err / bound).max()):.3f}")
    assert bool((err <= bound).all())


def test_reference_module_is_the_kernels_math() -> None:
    """The loader's reference module (what bench's numerics are checked against) simulates INT8 tokens too."""
    qw, x = _record(), _acts()
    ref = build_linear(qw, CPU, "token", None, reference=True)
    assert isinstance(ref, ReferenceLinear) and "INT8 token activations simulated" in ref.kernel_label
    kernel = build_linear(qw, CPU, "token", None)
    assert isinstance(kernel, Int8Linear)
    expected = (int8q.fake_quantize_tokens(x.float()) @ qw.dequantize().T).to(torch.bfloat16)
    assert torch.equal(ref(x), expected)
    diff = (kernel(x).float() - ref(x).float()).abs()
    assert bool((diff <= 2**-7 * ref(x).float().abs() + 1e-3).all()), float(diff.max())


def test_zero_rows_and_small_batches() -> None:
    qw = _record()
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert torch.equal(Int8Linear(qw, CPU)(x), torch.zeros(1, 96, dtype=torch.bfloat16))


def test_unsupported_records_and_shapes_name_the_reason() -> None:
    assert "kind 'int'" in int8_linear.unsupported_reason(quantize_rtn(torch.randn(8, 32), 8, -1, True), CPU)
    odd = int8q.quantize_weight(torch.randn(12, 36), torch.bfloat16)
    assert int8_linear.unsupported_reason(odd, CPU) is None  # the CPU kernel takes any shape
    x = torch.randn(3, 36)
    ref = int8q.fake_quantize_tokens(x) @ odd.dequantize().T
    assert torch.allclose(Int8Linear(odd, CPU, dtype=torch.float32)(x), ref, rtol=1e-5, atol=1e-6)
    if torch.cuda.is_available():
        assert "multiples of 8" in int8_linear.unsupported_reason(odd, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
def test_cuda_kernel_matches_cpu_kernel(rows) -> None:
    qw, x = _record(), _acts(rows)
    cuda = torch.device("cuda")
    y = Int8Linear(qw, cuda)(x.to(cuda)).cpu()
    assert torch.equal(y, Int8Linear(qw, CPU)(x))  # same exact int32 sums, same float32 scaling
