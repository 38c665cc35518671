"""qwenquant writes compressed-tensors FP8 tensors itself; they must be what the library's own compressor writes."""

from __future__ import annotations

import pytest
import torch

from qwenquant.export.compressed_tensors import compressor_linear_tensors, fp8_linear_tensors, fp8_scheme
from qwenquant.quant import fp8 as fp8q
from qwenquant.stages.fp8 import FP8Stage


@pytest.mark.parametrize("weights", ["channel", "tensor", "block"])
@pytest.mark.parametrize("activations", ["dynamic", "static", "none"])
def test_fp8_tensors_equal_the_compressor(weights, activations) -> None:
    if weights == "block" and activations == "static":
        pytest.skip("not a valid scheme (refused by the recipe)")
    cfg = FP8Stage(weights=weights, activations=activations, block_size=32)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 96, generator=g) * 0.02).to(torch.bfloat16)
    w[7, 3], w[150, 90], w[11, 0] = 2.5, -1e-30, 0.0  # an outlier, a subnormal, a zero
    qw = fp8q.quantize_fp8(w, weights, 32, scale_dtype=torch.bfloat16)
    input_scale = torch.tensor([0.0123], dtype=torch.bfloat16) if activations == "static" else None
    ours = fp8_linear_tensors(qw, input_scale)
    theirs = compressor_linear_tensors(qw, fp8_scheme(cfg), input_scale)
    assert list(ours) == list(theirs)  # the order decides where shards are cut
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        assert torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)), k
