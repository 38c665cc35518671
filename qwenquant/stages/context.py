"""What a stage sees: one decoder layer on the compute device, its captured calibration inputs, the run state, and
the hooks a stage may use (observe Linear inputs, freeze a finished submodule's outputs)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qwenquant.activations import ActivationCache, StopForward, to_device
from qwenquant.distributed import World
from qwenquant.model.moe import observe_all_tokens
from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.state import ActivationSpec, QuantState


@dataclass
class LayerContext:
    """What a stage sees: one decoder layer on the compute device and its captured inputs."""

    index: int
    prefix: str  # e.g. "model.layers.3."
    layer: nn.Module
    adapter: ArchAdapter
    cache: ActivationCache
    device: torch.device
    model_config: object
    state: QuantState
    quantizer: object = None  # the recipe's quantizer config (a smooth stage's alpha search measures its error)
    float_state: dict[str, torch.Tensor] | None = None  # the layer as it entered the quantizer (compensate only)
    float_cache: ActivationCache | None = None  # this layer's inputs in the unquantized model (compensate target=float)
    # per Linear: the weight a quantizer rounded to nearest when that is not the float weight (GPTQ's error-fed
    # weights); compensation tunes the rounding from it
    pre_rounding: dict[str, torch.Tensor] = field(default_factory=dict)
    # the ranks of a distributed run (qwenquant/distributed.py): `cache` holds this rank's calibration samples only,
    # so a stage's statistics are combined with the world's collectives
    world: World = field(default_factory=World)
    _stop_early: bool = field(default=False, repr=False)
    _batch: int = field(default=0, repr=False)
    _frozen: dict[str, tuple[nn.Module, Callable | None]] = field(default_factory=dict, repr=False)
    _float32: dict[str, tuple[nn.Module, Callable | None]] = field(default_factory=dict, repr=False)

    def linear(self, name: str) -> nn.Linear:
        return self.layer.get_submodule(name)  # type: ignore[return-value]

    def full_name(self, name: str) -> str:
        return self.prefix + name

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor]:
        """Run the layer over every calibration batch (with the current weights and hooks).

        Inside `observe_inputs(..., stop_early=True)` each batch stops once every observed Linear has seen its
        input (nothing after it is needed), so outputs cannot be kept there."""
        if keep_outputs and self._stop_early:
            raise RuntimeError("forward(keep_outputs=True) inside observe_inputs(stop_early=True)")
        outs = []
        for self._batch, (h, kw) in enumerate(zip(self.cache.hidden, self.cache.kwargs)):
            try:
                out = self.layer(h.to(self.device), **to_device(kw, self.device))
            except StopForward:
                continue
            out = out[0] if isinstance(out, tuple) else out
            if keep_outputs:
                outs.append(out.detach().to(self.cache.store_device))
        return outs

    @contextmanager
    def observe_inputs(self, names: list[str], fn: Callable[[str, torch.Tensor], None],
                       stop_early: bool = True) -> Iterator[None]:
        """Call fn(name, input) for each listed Linear during forwards inside the block.

        `stop_early`: abandon each batch's forward once all listed Linears have seen their inputs (true-sequential
        GPTQ observes q/k/v, o, gate/up and down in turn; the rest of the layer would be computed for nothing)."""
        handles, seen = [], set()
        wanted = set(names)

        def hook(_m, args, name):
            fn(name, args[0].detach())
            if stop_early:
                seen.add(name)
                if seen >= wanted:
                    seen.clear()
                    raise StopForward

        try:
            for name in names:
                handles.append(self.linear(name).register_forward_pre_hook(partial(hook, name=name)))
            self._stop_early = stop_early
            with observe_all_tokens(self.layer, names):  # MoE: observed experts see every token (model/moe.py)
                yield
        finally:
            self._stop_early = False
            for h in handles:
                h.remove()

    @property
    def batch(self) -> int:
        """Index of the calibration batch the current `forward` is on."""
        return self._batch

    def freeze_outputs(self, submodule: str, shortcut: Callable[[int, Callable[[], object]], object] | None = None
                       ) -> None:
        """Promise that `submodule`'s weights are final for the rest of this stage: from now on its output per
        calibration batch is computed once and then reused (e.g. self_attn once q/k/v/o are quantized, saving the
        attention in the later GPTQ passes). `unfreeze_all` ends the promise; the pipeline calls it before every
        stage and after propagation. `shortcut(batch, run)`, when given, makes that one computation: the output by
        a cheaper route, or `run()` (the submodule's own forward) - see `linear_output_shortcut`."""
        module = self.layer.get_submodule(submodule)
        if submodule in self._frozen:
            return
        outputs: list = [None] * len(self.cache.hidden)
        original = module.forward
        ctx = self

        def forward(*args, **kwargs):
            if outputs[ctx._batch] is None:
                def run():
                    return original(*args, **kwargs)

                out = run() if shortcut is None else shortcut(ctx._batch, run)
                outputs[ctx._batch] = to_device(out, ctx.cache.store_device)
            return to_device(outputs[ctx._batch], ctx.device)

        self._frozen[submodule] = (module, module.__dict__.get("forward"))  # an instance forward (hooks) or None
        module.forward = forward

    def linear_output_shortcut(self, linear: str, inputs: dict[int, torch.Tensor]
                               ) -> Callable[[int, Callable[[], object]], object]:
        """A `freeze_outputs` shortcut for a submodule that returns its Linear `linear`'s output (alone, or in a
        tuple beside Nones: attention's (o_proj(x), None)) given that Linear's input per batch, `inputs`, recorded
        while observing it: the output is `linear(inputs[batch])`, one matmul instead of the whole submodule.

        Whether the submodule really returns exactly that is checked, not assumed: the first batch runs the
        submodule itself, with a hook on the Linear; the route is taken for the later batches only if that run
        called the Linear once, on an input equal to the recorded one, and returned that very output tensor.
        Otherwise (or for a batch with no recorded input) every batch runs the submodule."""
        module = self.linear(linear)
        route: list = [None]  # None: not checked yet; False: run the submodule; else `_returned_slot`'s (slot, size)

        def shortcut(batch: int, run: Callable[[], object]) -> object:
            x = inputs.pop(batch, None)
            if x is None or route[0] is False:
                return run()
            if route[0] is None:
                calls: list = []
                handle = module.register_forward_hook(lambda _m, args, out: calls.append((args[0], out)))
                try:
                    out = run()
                finally:
                    handle.remove()
                route[0] = _returned_slot(out, calls, x)
                return out
            y = module(x.to(self.device))
            slot, size = route[0]
            return y if slot is None else tuple(y if j == slot else None for j in range(size))

        return shortcut

    def float32_matmuls(self, names: list[str]) -> bool:
        """Until `unfreeze_all` (so through the propagation after the stage too), the listed Linears compute
        `F.linear` in float32 from their bf16 / fp16 input and weight and round the result to the input dtype -
        where the device has no native kernel for that dtype (a CPU without AVX512-BF16 / AMX: there torch falls
        back to a generic GEMM about 10x slower than float32). The products of two bf16 (or fp16) numbers are
        exact in float32 and both paths accumulate in float32 before the one rounding, so the result differs from
        the native call only in the order of the float32 sums (a last-bit difference in ~1e-4 of the outputs).
        Returns whether it applies here (the layer's dtype on this device)."""
        dtype = next(self.layer.parameters()).dtype
        if not slow_reduced_matmul(dtype, self.device):
            return False
        for name in names:
            module = self.linear(name)
            if name in self._float32:
                continue
            self._float32[name] = (module, module.__dict__.get("forward"))
            module.forward = partial(float32_linear, module)
        return True

    def unfreeze_all(self) -> None:
        """End every promise and override the stage made (frozen outputs, float32 matmuls)."""
        for module, instance_forward in (*self._frozen.values(), *self._float32.values()):
            if instance_forward is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = instance_forward
        self._frozen.clear()
        self._float32.clear()

    def activation_specs(self) -> dict[str, ActivationSpec]:
        """This layer's activation specs, keyed by names relative to the layer."""
        return {
            name[len(self.prefix):]: spec
            for name, spec in self.state.activations.items()
            if name.startswith(self.prefix)
        }


def _returned_slot(out, calls: list, x: torch.Tensor) -> tuple[int | None, int] | bool:
    """Where a submodule's output `out` holds the output of its Linear's one call in `calls` [(input, output)], made
    on an input equal to `x`: (None, 0) for the output itself, (j, len) for slot j of a tuple of Nones otherwise;
    False when it does not."""
    if len(calls) != 1:
        return False
    seen_x, y = calls[0]
    if not isinstance(seen_x, torch.Tensor) or seen_x.shape != x.shape or not torch.equal(seen_x, x.to(seen_x.device)):
        return False
    if out is y:
        return None, 0
    if isinstance(out, tuple):
        slots = [j for j, o in enumerate(out) if o is y]
        if len(slots) == 1 and all(o is None for j, o in enumerate(out) if j != slots[0]):
            return slots[0], len(out)
    return False


def float32_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` computed in float32 and rounded to x's dtype once (see `LayerContext.float32_matmuls`)."""
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x.float(), module.weight.float(), bias).to(x.dtype)


def slow_reduced_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `dtype` matmuls on `device` take torch's generic CPU fallback (no oneDNN kernel for that dtype)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        native = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16
                  else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # no such query in this torch build: assume the fast path exists
        native = True
    return not (native and torch.backends.mkldnn.is_available())
