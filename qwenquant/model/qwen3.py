"""Everything qwenquant knows about Qwen3's module layout, as data.

Adding an architecture means adding one `ArchAdapter` here; nothing else names transformers modules.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmoothMapping:
    """Activation scaling factors fold into `smooth` (an RMSNorm, or a Linear's output rows) and into the
    input columns of the `balance` Linears that read its output. `kind` is "norm" or "linear"; "gqa" marks
    v_proj -> o_proj, where one v channel feeds several query heads' o_proj columns."""

    smooth: str
    balance: tuple[str, ...]
    kind: str
    gqa: bool = False


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths and groupings of one decoder architecture (names relative to a decoder layer)."""

    architectures: tuple[str, ...]
    layers_path: str
    linears: tuple[str, ...]
    sequential_groups: tuple[tuple[str, ...], ...]  # quantize in this order, each seeing quantized predecessors
    fused_groups: tuple[tuple[str, ...], ...]  # vLLM fuses these: one scheme, one ignore status
    smooth_mappings: tuple[SmoothMapping, ...]
    always_ignore: tuple[str, ...] = ("lm_head",)
    norms: tuple[str, ...] = ()  # the layer's RMSNorms on the residual stream (tuned by compensation)
    head_norms: tuple[str, ...] = ()  # per-head norms on q/k (Qwen3's q_norm/k_norm), tuned only on request
    fused_names: tuple[str, ...] = ()  # vLLM/SGLang module name of each fused group (same order as fused_groups)
    # submodule -> the Linears that alone determine its output given its input (its output can be reused once
    # they are final, e.g. attention after q/k/v/o in true-sequential GPTQ)
    output_determined_by: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def fused_group_of(self, linear: str) -> tuple[str, ...]:
        for group in self.fused_groups:
            if linear in group:
                return group
        return (linear,)


QWEN3 = ArchAdapter(
    architectures=("Qwen3ForCausalLM",),
    layers_path="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    fused_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ),
    fused_names=("self_attn.qkv_proj", "mlp.gate_up_proj"),
    # q_norm/k_norm act on q/k *outputs*, so scaling q/k/v inputs through input_layernorm is exact; nothing is
    # ever folded through q_norm/k_norm (that would change the function).
    smooth_mappings=(
        SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), "linear", gqa=True),
        SmoothMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
        SmoothMapping("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
    output_determined_by=(
        ("self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    ),
)

ADAPTERS: tuple[ArchAdapter, ...] = (QWEN3,)


def supported_architectures() -> list[str]:
    return [a for adapter in ADAPTERS for a in adapter.architectures]


def adapter_for(architecture: str) -> ArchAdapter | None:
    for adapter in ADAPTERS:
        if architecture in adapter.architectures:
            return adapter
    return None


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each decoder Linear, from config.json alone (no weights loaded)."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
