"""Everything qwenquant knows about Qwen3's module layout, as data.

Adding an architecture means adding one `ArchAdapter` here; nothing else names transformers modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class SmoothMapping:
    """Activation scaling factors fold into `smooth` (an RMSNorm, or a Linear's output rows) and into the
    input columns of the `balance` Linears that read its output. `kind` is "norm" or "linear"; "gqa" marks
    v_proj -> o_proj, where one v channel feeds several query heads' o_proj columns. `passthrough`: modules that
    also read `smooth`'s output but are never quantized (an MoE router): their input columns take the factors too,
    so the function is unchanged, but they play no part in choosing them."""

    smooth: str
    balance: tuple[str, ...]
    kind: str
    gqa: bool = False
    passthrough: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoESpec:
    """A sparse MoE block of a decoder layer (names relative to the layer). transformers keeps the experts fused
    (`fused_params`: gate_up [E, 2I, H], down [E, H, I]); qwenquant.model.moe splits them at load into one Linear
    per expert projection, named as on disk: `{experts}.{e}.{projection}`. The router stays in the source dtype."""

    experts: str
    router: str
    projections: tuple[str, str, str]  # gate, up, down
    fused_params: tuple[str, str]  # transformers' fused gate_up and down parameters of the experts module
    num_experts_keys: tuple[str, ...]  # config keys holding the expert count (the first one present)
    dense_layers_key: str  # config key listing layers with a dense MLP
    sparse_step_key: str  # config key: every n-th layer is sparse

    def num_experts(self, config) -> int:
        return int(next((v for k in self.num_experts_keys if (v := config_value(config, k)) is not None), 0))

    def is_sparse(self, config, index: int) -> bool:
        """transformers' and vLLM's rule for Qwen3-MoE: not listed as dense, and (index + 1) % step == 0."""
        step = config_value(config, self.sparse_step_key) or 1
        dense = config_value(config, self.dense_layers_key) or ()
        return self.num_experts(config) > 0 and index not in dense and (index + 1) % step == 0


def config_value(config, key: str, default=None):
    """A config value from config.json (a dict) or a transformers config object."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


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
    # consecutive sequential groups (named by their first Linear) whose inputs do not depend on one another, so one
    # forward observes them all (MoE: every expert's down_proj)
    observed_together: tuple[tuple[str, ...], ...] = ()
    # Linears an engine runs as ONE module, beyond fused_groups: one scheme and one ignore status, while each fused
    # group inside keeps its own scales (vLLM's FusedMoE holds every expert of a layer)
    scheme_groups: tuple[tuple[str, ...], ...] = ()
    unquantized: tuple[str, ...] = ()  # modules engines load as Linears that always stay in the source dtype
    input_scale_groups: tuple[tuple[str, ...], ...] = ()  # static FP8: the engine uses the max input scale of each
    moe: MoESpec | None = None  # sparse layers (see `for_layer`)
    # model-level modules (full names) that the layer-streamed evaluation of --offload-dir runs itself: after the
    # last decoder layer, final_norm then lm_head; rotary's buffers are computed at init, rebuilt off the meta device
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    embed: str = "model.embed_tokens"
    # Linears that get a bias when config.json's `bias_key` is true (Qwen3: attention_bias, false in every release)
    biased: tuple[str, ...] = ()
    bias_key: str = "attention_bias"
    attention: str = "self_attn"  # the attention module (its K/V go to the cache; k_scale / v_scale live on it)

    def fused_group_of(self, linear: str) -> tuple[str, ...]:
        """The Linears sharing `linear`'s scheme and ignore status in an engine (a singleton when unfused)."""
        for group in self.scheme_groups + self.fused_groups:
            if linear in group:
                return group
        return (linear,)

    def for_layer(self, config, index: int) -> ArchAdapter:
        """The adapter of decoder layer `index`: itself, or for a sparse MoE layer its expert-level variant."""
        if self.moe is None or not self.moe.is_sparse(config, index):
            return self
        return _sparse_layer(self, self.moe.num_experts(config))

    def layers(self, config, num_layers: int) -> list[ArchAdapter]:
        """`for_layer` of every decoder layer."""
        return [self.for_layer(config, i) for i in range(num_layers)]


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
    biased=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    output_determined_by=(
        ("self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    ),
)


def _dense(names) -> bool:
    return not any(n.startswith("mlp.") for n in names)


@lru_cache(maxsize=None)
def _sparse_layer(base: ArchAdapter, num_experts: int) -> ArchAdapter:
    """`base`'s description of a dense Qwen3 layer with the MLP replaced by `num_experts` experts.

    - Every expert's gate/up reads the same input (post_attention_layernorm's output): one sequential group (under
      calibration every expert sees every token, qwenquant/model/moe.py, so one GPTQ Hessian serves them all); each
      expert's down reads its own input: one group per expert.
    - vLLM fuses each expert's gate/up into w13[e] (per-tensor FP8 scales are maxed over the two): fused groups.
      All experts form one FusedMoE module: one scheme group (kept or quantized whole by mixed precision).
    - Static FP8 activations: vLLM's FusedMoE keeps one input scale for all experts' gate/up and one for all
      downs (the max over experts): input scale groups.
    - Smoothing: post_attention_layernorm -> every expert's gate/up, the router (mlp.gate) passing the factors
      through unquantized; up -> down within each expert.
    """
    moe = base.moe
    g, u, d = moe.projections
    experts = [tuple(f"{moe.experts}.{e}.{p}" for p in (g, u, d)) for e in range(num_experts)]
    gate_up = tuple(n for ge, ue, _ in experts for n in (ge, ue))
    fused = [(grp, name) for grp, name in zip(base.fused_groups, base.fused_names) if _dense(grp)]
    return dataclasses.replace(
        base,
        linears=tuple(n for n in base.linears if _dense((n,))) + tuple(n for ex in experts for n in ex),
        sequential_groups=tuple(grp for grp in base.sequential_groups if _dense(grp)) + (gate_up,)
        + tuple((de,) for _, _, de in experts),
        fused_groups=tuple(grp for grp, _ in fused) + tuple((ge, ue) for ge, ue, _ in experts),
        fused_names=tuple(name for _, name in fused) + (moe.experts,) * num_experts,
        scheme_groups=(tuple(n for ex in experts for n in ex),),
        smooth_mappings=tuple(m for m in base.smooth_mappings if _dense((m.smooth,) + m.balance))
        + (SmoothMapping("post_attention_layernorm", gate_up, "norm", passthrough=(moe.router,)),)
        + tuple(SmoothMapping(ue, (de,), "linear") for _, ue, de in experts),
        unquantized=(moe.router,),
        input_scale_groups=(gate_up, tuple(de for _, _, de in experts)),
        observed_together=(tuple(de for _, _, de in experts),),
    )


# Qwen3-30B-A3B, Qwen3-235B-A22B. The base fields describe a dense layer (`mlp_only_layers`; Qwen3MoeMLP has
# Qwen3's names); `for_layer` gives a sparse layer's expert-level variant.
QWEN3_MOE = dataclasses.replace(
    QWEN3,
    architectures=("Qwen3MoeForCausalLM",),
    moe=MoESpec(
        experts="mlp.experts",
        router="mlp.gate",
        projections=("gate_proj", "up_proj", "down_proj"),
        fused_params=("gate_up_proj", "down_proj"),
        num_experts_keys=("num_experts", "num_local_experts"),  # hub config.json / transformers 5 save_pretrained
        dense_layers_key="mlp_only_layers",
        sparse_step_key="decoder_sparse_step",
    ),
)

ADAPTERS: tuple[ArchAdapter, ...] = (QWEN3, QWEN3_MOE)


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
    q = config["num_attention_heads"] * head_dim(config)
    kv = config["num_key_value_heads"] * head_dim(config)
    inter = config["intermediate_size"]
    shapes = {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    adapter = next((a for a in map(adapter_for, config.get("architectures") or []) if a is not None), None)
    moe = adapter.moe if adapter is not None else None
    if moe is None:
        return shapes
    sparse = [moe.is_sparse(config, i) for i in range(int(config["num_hidden_layers"]))]
    if all(sparse):  # no dense MLP anywhere
        shapes = {n: s for n, s in shapes.items() if not n.startswith("mlp.")}
    if any(sparse):  # one entry stands for every expert ("*")
        e_inter = config["moe_intermediate_size"]
        g, u, d = (f"{moe.experts}.*.{p}" for p in moe.projections)
        shapes |= {g: (e_inter, hidden), u: (e_inter, hidden), d: (hidden, e_inter)}
    return shapes


def head_dim(config: dict) -> int:
    """Width of one attention head (config.json's head_dim; hidden / heads when it has none)."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Full name -> shape of every tensor a checkpoint of this architecture stores, from config.json alone (sizing a
    run before the weights are downloaded), in the model's state-dict order: the embedding, each decoder layer (its
    Linears with their biases, head norms, norms, an MoE layer's router and per-expert projections as on disk), the
    final norm, and lm_head unless tied to the embedding."""
    adapter = next((a for a in map(adapter_for, config.get("architectures") or []) if a is not None), None)
    if adapter is None:
        raise ValueError(f"checkpoint_shapes: architecture {config.get('architectures')} is not supported")
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    linears = linear_shapes(config)
    bias = bool(config.get(adapter.bias_key, False))
    shapes: dict[str, tuple[int, ...]] = {f"{adapter.embed}.weight": (vocab, hidden)}
    for i, layer in enumerate(adapter.layers(config, int(config["num_hidden_layers"]))):
        prefix = f"{adapter.layers_path}.{i}."
        for name in layer.linears:
            n, k = linears[_expert_pattern(name, layer.moe)]
            shapes[f"{prefix}{name}.weight"] = (n, k)
            if bias and name in layer.biased:
                shapes[f"{prefix}{name}.bias"] = (n,)
        shapes |= {f"{prefix}{name}.weight": (head_dim(config),) for name in layer.head_norms}
        for router in layer.unquantized:
            shapes[f"{prefix}{router}.weight"] = (layer.moe.num_experts(config), hidden)
        shapes |= {f"{prefix}{name}.weight": (hidden,) for name in layer.norms}
    shapes[f"{adapter.final_norm}.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes[f"{adapter.lm_head}.weight"] = (vocab, hidden)
    return shapes


def _expert_pattern(name: str, moe: MoESpec | None) -> str:
    """`mlp.experts.7.gate_proj` -> `mlp.experts.*.gate_proj` (the key `linear_shapes` gives every expert)."""
    head = f"{moe.experts}." if moe is not None else None
    if head is None or not name.startswith(head):
        return name
    return head + "*." + name[len(head):].split(".", 1)[1]
