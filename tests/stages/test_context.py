"""LayerContext's forward helpers: a frozen submodule's linear-output shortcut takes its route only when the
submodule really returns its Linear's output, and float32 matmuls differ from the native bf16 ones only in the
order of the float32 sums (and are undone by unfreeze_all)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenquant.activations import ActivationCache
from qwenquant.stages.context import LayerContext, float32_linear, slow_reduced_matmul
from qwenquant.state import QuantState

CPU = torch.device("cpu")


class Block(nn.Module):
    """`sub.proj`'s output is the submodule's output (as attention's o_proj), or not (`offset`: it adds a bias)."""

    def __init__(self, returns: str = "tensor"):
        super().__init__()
        self.sub = nn.Module()
        self.sub.pre = nn.Linear(8, 8, bias=False)
        self.sub.proj = nn.Linear(8, 8, bias=False)
        self.returns = returns
        self.sub.forward = self._sub_forward

    def _sub_forward(self, x):
        y = self.sub.proj(torch.relu(self.sub.pre(x)))
        return {"tensor": y, "tuple": (y, None), "offset": y + 1.0}[self.returns]

    def forward(self, x):
        return self.sub(x) if self.returns != "tuple" else self.sub(x)[0]


def _ctx(layer: nn.Module, batches: int) -> LayerContext:
    g = torch.Generator().manual_seed(0)
    cache = ActivationCache([torch.randn(3, 8, generator=g) for _ in range(batches)], [{} for _ in range(batches)])
    return LayerContext(0, "model.layers.0.", layer, None, cache, CPU, None, QuantState())


@pytest.mark.parametrize(("returns", "route"), [("tensor", True), ("tuple", True), ("offset", False)])
def test_linear_output_shortcut_checks_its_route(returns: str, route: bool) -> None:
    layer = Block(returns)
    ctx = _ctx(layer, 3)
    with torch.no_grad():
        expected = ctx.forward(keep_outputs=True)
    inputs: dict[int, torch.Tensor] = {}
    handle = layer.sub.proj.register_forward_pre_hook(lambda _m, args: inputs.__setitem__(ctx.batch, args[0]))
    with torch.no_grad():
        ctx.forward()
    handle.remove()
    ran = []
    shortcut = ctx.linear_output_shortcut("sub.proj", inputs)
    ctx.freeze_outputs("sub", lambda batch, run: shortcut(batch, lambda: ran.append(batch) or run()))
    with torch.no_grad():
        got = ctx.forward(keep_outputs=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert ran == ([0] if route else [0, 1, 2])  # batch 0 checks the route; without it every batch runs itself
    ctx.unfreeze_all()
    assert "forward" not in layer.sub.__dict__ or layer.sub.forward == layer._sub_forward


@torch.no_grad()
def test_float32_matmuls_differ_only_in_sum_order() -> None:
    layer = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 64, bias=False)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 256, generator=g).to(torch.bfloat16)
    native = layer[0](x)
    fast = float32_linear(layer[0], x)
    assert fast.dtype == torch.bfloat16
    exact = (x.double() @ layer[0].weight.double().T + layer[0].bias.double())
    # the same float32 products summed in another order: a rare output lands one bf16 step away (or a few, where
    # the sum cancels to far below its terms: float32 sum error ~ 2^-24 sum |terms|)
    assert (fast != native).float().mean() < 1e-2
    terms = x.double().abs() @ layer[0].weight.double().abs().T + layer[0].bias.double().abs()
    bound = native.double().abs() * 2.0**-7 + terms * 2.0**-20
    assert bool(((fast.double() - native.double()).abs() <= bound).all())
    assert float((fast.double() - exact).abs().mean()) <= 1.01 * float((native.double() - exact).abs().mean())

    ctx = _ctx(layer, 1)
    ctx.cache.hidden[0] = x
    applied = ctx.float32_matmuls(["0", "1"])
    assert applied == slow_reduced_matmul(torch.bfloat16, CPU)
    with torch.no_grad():
        out = layer(x)
        want = float32_linear(layer[1], float32_linear(layer[0], x)) if applied else layer[1](layer[0](x))
    assert torch.equal(out, want)
    ctx.unfreeze_all()
    assert "forward" not in layer[0].__dict__ and "forward" not in layer[1].__dict__
    assert not slow_reduced_matmul(torch.float32, CPU) and not slow_reduced_matmul(torch.bfloat16, torch.device("cuda"))
