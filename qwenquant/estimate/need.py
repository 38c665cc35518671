"""What a stage's cost functions (`StageSpec.host_bytes`, `seconds`: qwenquant/stages/spec.py) may ask about the run:
the model's Linears, the run's token counts, the model dtype's bytes and, for times, the speed probe's rates turned
into the costs every stage is built from (a layer forward over the calibration set, a pass of the quantizer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwenquant.estimate.facts import MODEL_DTYPE_BYTES, LinearInfo, ModelFacts, RunShape
from qwenquant.stages.registry import spec_of

CALIB_BATCH = 8  # the loop's calibration batch (samples per layer forward)
WEIGHT_COPIES = 3  # float32 copies of a Linear's weight while it is quantized (weight, dequantized copy, error)


@dataclass(frozen=True)
class StageNeed:
    """The run as a stage's cost functions see it; `probe` (a qwenquant.estimate.probe.Probe) only for times."""

    facts: ModelFacts
    shape: RunShape
    dtype_bytes: int
    probe: object = None

    # -- shapes --------------------------------------------------------------------------------------------------

    @property
    def layers(self) -> int:
        return self.facts.num_layers

    @property
    def linears(self) -> list[LinearInfo]:
        return self.facts.linears

    @property
    def config(self) -> dict:
        return self.facts.config

    def layer_linears(self, i: int = 0) -> list[LinearInfo]:
        return [l for l in self.facts.linears if l.layer == i]

    def layer_params(self, i: int = 0) -> int:
        return self.facts.layer_linear_params(i)

    @property
    def groups(self) -> list[list[LinearInfo]]:
        """Linears sharing one input (q/k/v, o, gate/up, down of each layer); singletons when unknown."""
        return self.facts.groups or [[l] for l in self.facts.linears]

    @property
    def weights(self) -> int:
        """Weights of every decoder Linear."""
        return self.facts.linear_params

    @property
    def largest_linear(self) -> int:
        return max((l.n * l.k for l in self.facts.linears), default=1)

    @property
    def widest_input(self) -> int:
        return max((l.k for l in self.facts.linears), default=1)

    @property
    def calib_tokens(self) -> int:
        return self.shape.calib_tokens

    @property
    def seq_len(self) -> int:
        return self.shape.seq_len

    def weight_copies(self) -> tuple[int, str]:
        """The transient of quantizing the largest Linear: its float32 copies."""
        return WEIGHT_COPIES * 4 * self.largest_linear, "float32 copies of the largest Linear"

    # -- times (need the probe) ----------------------------------------------------------------------------------

    @property
    def fp32_flops(self) -> float:
        return self.probe.fp32_gflops * 1e9

    @property
    def quant_pass(self) -> float:
        """One round-to-nearest pass of the quantizer over every decoder Linear."""
        return self.weights * self.probe.quant_s_per_weight + len(self.facts.linears) * self.probe.quant_s_per_linear

    @property
    def layer_scale(self) -> float:
        """An average decoder layer's Linear weights over the probed layer's (a dense layer built from the config;
        MoE layers hold every expert)."""
        probe_layer = max(self.facts.layer_linear_params(0), 1)
        return self.facts.linear_params / max(self.layers, 1) / probe_layer

    @property
    def token_s(self) -> float:
        """One average decoder layer's forward per token without attention, every weight (MoE: every expert)
        seeing it, in the model dtype (calibration forwards)."""
        return self.probe.layer_s_per_token * self.layer_scale

    @property
    def act_quant_s_per_token(self) -> float:
        """Simulated activation quantization per token and layer (0 unless the quantizer quantizes activations)."""
        return self.probe.act_quant_s_per_element * sum(l.k for l in self.layer_linears(0))

    def layer_forward(self, tokens: int, seq: int, quantized_acts: bool = False) -> float:
        """One decoder layer over the calibration set (in batches of CALIB_BATCH samples)."""
        calls = math.ceil(self.shape.calib_samples / CALIB_BATCH)
        per_token = self.token_s + self.probe.attn_s_per_token2 * seq + (
            self.act_quant_s_per_token if quantized_acts else 0.0)
        return calls * self.probe.layer_s_per_call + tokens * per_token

    def calibration_forwards(self, quantized_acts: bool = False) -> float:
        """Every decoder layer once over the calibration set."""
        return self.layers * self.layer_forward(self.calib_tokens, self.seq_len, quantized_acts)


def stage_need(recipe, facts: ModelFacts, shape: RunShape, probe=None) -> StageNeed:
    return StageNeed(facts, shape, MODEL_DTYPE_BYTES[recipe.model.dtype], probe)


COSTS = {"host_bytes": "its memory", "seconds": "its time"}
ROLE_COSTS = {"quantizer": {"record_bytes": "its records' memory", "probe_quantize": "the quantizer's probed rates",
                             "label": "its settings"},
              "plan": {"kept_linears": "which Linears it keeps (sizes assume none)"}}


def missing_costs(recipe) -> list[str]:
    """A note for every cost function a stage of the recipe does not declare (that part is left out)."""
    notes = []
    for cfg in recipe.stages:
        spec = spec_of(cfg)
        wanted = COSTS | ROLE_COSTS.get(spec.role, {})
        for field_name, what in wanted.items():
            if getattr(spec, field_name) is None:
                notes.append(f"stage {spec.name} declares no {field_name} cost: {what} is not in the estimate")
    return notes
