"""`qwenquant bench` on NVFP4 checkpoints: the tensors read back into the record the run wrote, and the Linear runs
dequantized (labelled so: no FP4 kernel here), or, as the reference, with the FP4 input simulation of the run."""

from __future__ import annotations

import torch

from qwenquant.export import ct_nvfp4
from qwenquant.kernels.checkpoint_records import activation_scheme, record_from_tensors
from qwenquant.kernels.loader import DenseLinear, ReferenceLinear, build_linear
from qwenquant.quant import nvfp4 as nvq

CPU = torch.device("cpu")


def test_record_and_modules() -> None:
    torch.manual_seed(0)
    qw = nvq.quantize_nvfp4((torch.randn(32, 64) * 0.05).to(torch.bfloat16))
    g_in = nvq.global_scale(4.0)
    config = ct_nvfp4.quantization_config(True, ["lm_head"])
    local = ct_nvfp4.linear_tensors(qw, g_in)
    back = record_from_tensors(local, config, "model.layers.0.mlp.up_proj")
    assert back.kind == "nvfp4" and torch.equal(back.q, qw.q) and torch.equal(back.dequantize(), qw.dequantize())
    acts = activation_scheme(config)
    assert acts == "tensor_group"
    x = (torch.randn(3, 64) * 2).to(torch.bfloat16)
    dense = build_linear(back, CPU, acts, g_in)
    assert isinstance(dense, DenseLinear) and "dequantized to bf16 at load" in dense.kernel_label
    assert "FP4 activations not simulated" in dense.kernel_label
    assert torch.equal(dense.weight, qw.dequantize(torch.bfloat16))
    ref = build_linear(back, CPU, acts, g_in, reference=True)
    assert isinstance(ref, ReferenceLinear)
    expected = torch.nn.functional.linear(nvq.fake_quantize_activation(x.float(), g_in), qw.dequantize()).to(x.dtype)
    assert torch.equal(ref(x), expected)
    weight_only = build_linear(back, CPU, None, None)
    assert "activations not simulated" not in weight_only.kernel_label
