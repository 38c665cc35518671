"""GGUF export: our INT codes as Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 blocks, checked with gguf-py's own dequantization; the
float16 rounding of scales/minima measured; refusals; the file's metadata, tensor names and tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")
from gguf.quants import dequantize  # noqa: E402

from qwenquant.export import gguf_blocks  # noqa: E402
from qwenquant.export.gguf import read_metadata, read_tensors, write_gguf  # noqa: E402
from qwenquant.quant import intq  # noqa: E402
from qwenquant.quant.records import QuantizedWeight  # noqa: E402

CASES = [(8, True, "Q8_0"), (4, True, "Q4_0"), (4, False, "Q4_1"), (5, True, "Q5_0"), (5, False, "Q5_1")]


def random_record(bits: int, symmetric: bool, n: int = 48, k: int = 256, seed: int = 0) -> QuantizedWeight:
    """Codes over the whole unsigned range (both ends included), bf16 scales, zero points over their whole range."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32)
    q[0, :2] = torch.tensor([0, 2**bits - 1])
    scale = (torch.rand(n, k // 32, generator=gen) * 0.05 + 1e-3).to(torch.bfloat16)
    zero = (torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32) if symmetric else
            torch.randint(0, 2**bits, scale.shape, generator=gen, dtype=torch.int32))
    return QuantizedWeight("int", q, scale, "group", bits, symmetric, zero, 32)


@pytest.mark.parametrize("bits,symmetric,qtype", CASES)
def test_blocks_dequantize_to_our_weight(bits, symmetric, qtype):
    """gguf-py's dequantize of the written blocks equals our (q - z) * s in float32: bit for bit for the symmetric
    types; for Q4_1/Q5_1 bit for bit in every block whose minimum -z*s float16 holds, and elsewhere within the
    measured rounding of that minimum."""
    qw = random_record(bits, symmetric)
    packed = gguf_blocks.pack(qw)
    assert packed.qtype == qtype
    assert packed.data.shape == (48, 256 // 32 * gguf_blocks.BLOCK_BYTES[qtype])
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]] == (32, gguf_blocks.BLOCK_BYTES[qtype])
    theirs = dequantize(packed.data, gguf.GGMLQuantizationType[qtype])
    ours = qw.dequantize(torch.float32).numpy()
    if symmetric:
        assert np.array_equal(theirs, ours)
        assert packed.mins_rounded == 0
        return
    exact_min = -qw.zero_point.float() * qw.scale.float()
    held = (exact_min.to(torch.float16).float() == exact_min).numpy()  # [N, G]: fp16 holds this block's minimum
    per_col = np.repeat(held, 32, axis=1)
    assert held.any() and not held.all()  # both cases occur in this record
    assert np.array_equal(theirs[per_col], ours[per_col])
    deviation = float(np.abs(theirs - ours).max())
    assert packed.mins_rounded == int((~held).sum())
    # the weight moves by the minimum's rounding, plus at most one float32 rounding of d*q + m
    assert deviation <= packed.max_min_deviation * (1 + 1e-6) + float(np.abs(ours).max()) * 2**-23
    # measured: the minimum is rounded by at most half an fp16 ulp of |m| (relative 2**-11)
    assert packed.max_min_deviation <= float(exact_min.abs().max()) * 2**-11


def test_rtn_records_round_trip_through_gguf():
    """Real quantizer output (RTN g32, bf16 scales) of a weight: symmetric types exact."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    for bits in (4, 5, 8):
        qw = intq.quantize_rtn(w, bits, 32, True, scale_dtype=torch.bfloat16)
        packed = gguf_blocks.pack(qw)
        theirs = dequantize(packed.data, gguf.GGMLQuantizationType[packed.qtype])
        assert np.array_equal(theirs, qw.dequantize(torch.float32).numpy()), bits


def test_q4_0_and_q5_0_bit_layout():
    """Element j is the low nibble of byte j, element j+16 its high nibble; Q5's fifth bit is bit j of qh."""
    q = torch.arange(32, dtype=torch.int32).unsqueeze(0) % 16
    one = torch.ones(1, 1, dtype=torch.bfloat16)
    data = gguf_blocks.pack(QuantizedWeight("int", q, one, "group", 4, True, None, 32)).data[0]
    assert data[:2].view(np.float16)[0] == 1.0
    assert list(data[2:]) == [j | (j << 4) for j in range(16)]
    q5 = torch.arange(32, dtype=torch.int32).unsqueeze(0)
    data = gguf_blocks.pack(QuantizedWeight("int", q5, one, "group", 5, True, None, 32)).data[0]
    assert data[2:6].view(np.uint32)[0] == 0xFFFF0000  # elements 16..31 have bit 4 set
    assert list(data[6:]) == [j | (j << 4) for j in range(16)]


def test_scale_overflow_and_subnormal():
    qw = random_record(4, True)
    qw.scale[0, 0] = 1e5
    with pytest.raises(ValueError, match="overflow float16"):
        gguf_blocks.pack(qw)
    qw = random_record(4, True)
    qw.scale[0, 0] = 2.0**-20 * (1 + 2.0**-7)  # 8 significant bits: below 2**-17 fp16 loses them
    with pytest.warns(UserWarning, match="float16 cannot represent"):
        gguf_blocks.pack(qw)


@pytest.mark.parametrize("make,match", [
    (lambda: random_record(3, True), "use --bits 4, 5 or 8"),
    (lambda: random_record(8, False), "use --sym"),
    (lambda: QuantizedWeight("int", torch.zeros(4, 128, dtype=torch.int32), torch.ones(4, 2), "group", 4, True,
                             None, 64), "use --group-size 32"),
])
def test_refusals_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        gguf_blocks.pack(make())


def test_requested_type_must_hold_the_codes():
    with pytest.raises(ValueError, match="quantize with --asym --bits 4"):
        gguf_blocks.pack(random_record(4, True), "Q4_1")
    with pytest.raises(ValueError, match="quantize with --sym --bits 4"):
        gguf_blocks.check_type("Q4_0", 4, False)
    with pytest.raises(ValueError, match="act-order `group`"):
        gguf_blocks.check_groups(32, "group")


def _tiny_records(model, bits=4, symmetric=True):
    records, items = {}, []
    for key, t in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("proj.weight"):
            records[module] = intq.quantize_rtn(t.float(), bits, 32, symmetric, scale_dtype=t.dtype)
        items.append((key, t))
    return records, items


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_model_file(tmp_path, tiny_qwen3, tie):
    """Metadata llama.cpp's qwen3 loader reads, tensor names and types, the tokenizer, tied/untied output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16)
    if not tie:
        model.config.tie_word_embeddings = False
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    records, items = _tiny_records(model)
    if not tie:
        items = [(k, t.clone()) for k, t in items]
    info = write_gguf(tmp_path / "m.gguf", model.config.to_dict(), tok, items, records)
    meta = read_metadata(tmp_path / "m.gguf")
    expect = {"general.architecture": "qwen3", "qwen3.block_count": 2, "qwen3.context_length": 512,
              "qwen3.embedding_length": 128, "qwen3.feed_forward_length": 384, "qwen3.attention.head_count": 4,
              "qwen3.attention.head_count_kv": 2, "qwen3.attention.key_length": 32,
              "qwen3.attention.value_length": 32, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.add_bos_token": False}
    assert {k: meta.get(k) for k in expect} == expect
    assert meta["qwen3.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.tokens"] == 8192 and meta["tokenizer.ggml.merges"] == 7931
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    tensors = read_tensors(tmp_path / "m.gguf")
    assert ("output.weight" in tensors) is (not tie)
    assert tensors["blk.1.attn_q.weight"][0] == "Q4_0" and tensors["blk.0.ffn_down.weight"][0] == "Q4_0"
    assert tensors["blk.0.attn_q_norm.weight"][0] == "F32" and tensors["output_norm.weight"][0] == "F32"
    assert tensors["token_embd.weight"][0] == "BF16"
    assert np.array_equal(tensors["token_embd.weight"][1], model.model.embed_tokens.weight.detach().float().numpy())
    q = records["model.layers.1.self_attn.q_proj"].dequantize(torch.float32).numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight"][1], q)  # [N, K] as in HF: no permutation
    assert info["tensor_types"]["Q4_0"] == 14 and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0


def test_yarn_rope_and_unknown_pre_tokenizer(tmp_path, tiny_qwen3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenquant.errors import BadInputError
    from qwenquant.export.gguf_meta import pre_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16)
    config = model.config.to_dict()
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                 "rope_theta": 1e6}
    records, items = _tiny_records(model, 8)
    write_gguf(tmp_path / "y.gguf", config, AutoTokenizer.from_pretrained(tiny_qwen3), items, records)
    meta = read_metadata(tmp_path / "y.gguf")
    assert meta["qwen3.rope.scaling.type"] == "yarn" and meta["qwen3.rope.scaling.factor"] == 4.0
    assert meta["qwen3.rope.scaling.original_context_length"] == 128
    with pytest.raises(BadInputError, match="no pre-tokenizer known"):
        pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})
    qwen = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_meta_split()}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer({"pre_tokenizer": qwen}) == "qwen2"


def gguf_meta_split() -> str:
    from qwenquant.export.gguf_meta import QWEN2_SPLIT

    return QWEN2_SPLIT
