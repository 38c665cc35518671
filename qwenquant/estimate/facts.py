"""What the estimate knows before any weight is loaded: the model (config.json and the safetensors headers: names,
dtypes and shapes only) and the run's token counts (calibration, evaluation windows, the evaluation text).

Before download the headers come from the hub (`ResolvedModel.hub_headers`, qwenquant/model/hub.py), or, for a folder
without weights, every tensor is derived from config.json (`derived_tensors`: shapes from the architecture's data in
qwenquant/model/qwen3.py, the dtype config.json names); `ModelFacts.sizes_from` and `notes` say which."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from qwenquant.errors import BadInputError
from qwenquant.model.qwen3 import checkpoint_shapes

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # config.json dtype -> safetensors dtype
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
NO_WEIGHTS_NOTE = "sizes derived from config.json: no weights present"
HUB_HEADERS_NOTE = "sizes from the hub's safetensors headers: weights not downloaded"
WIKITEXT2_TEST_CHARS = 1_288_556  # WikiText-2 raw test, rows joined with "\n\n" (when the file is not local)
CHARS_PER_TOKEN = 4.3  # typical English text, for WikiText-2 when it is not local
TOKENIZER_SAMPLE_CHARS = 200_000  # a longer evaluation text is tokenized on this much and scaled


@dataclass
class TensorInfo:
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 2)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file (its JSON header only; no data is read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise BadInputError(f"{path}: corrupt or truncated safetensors header ({err}); re-download it") from err
    return _tensor_infos(header)


def _tensor_infos(header: dict) -> dict[str, TensorInfo]:
    return {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def header_bytes(entries: list[tuple[str, int, int]]) -> int:
    """Approximate safetensors header size for (name, ndim, bytes) entries (JSON with shapes and offsets)."""
    total = 8 + 32  # length prefix, {"__metadata__":{"format":"pt"}}
    offset = 0
    for name, ndim, nbytes in entries:
        total += len(name) + 44 + ndim * 6 + 2 * len(str(offset + nbytes))
        offset += nbytes
    return total + 8  # padding to 8 bytes


def _file_bytes(tensors: dict[str, TensorInfo]) -> int:
    """A safetensors file holding `tensors`: their bytes and its (estimated) header."""
    return sum(t.nbytes for t in tensors.values()) + header_bytes(
        [(n, len(t.shape), t.nbytes) for n, t in tensors.items()])


def config_dtype(config: dict) -> tuple[str, str]:
    """(safetensors dtype of the checkpoint's floating-point tensors as config.json names it, a note when it names
    none and bf16 is assumed)."""
    named = config.get("dtype") or config.get("torch_dtype")
    if named is None:
        return "BF16", "config.json names no dtype: the weights are assumed bf16"
    if named not in CONFIG_DTYPES:
        raise BadInputError(f"config.json: dtype {named!r} is not one of {', '.join(CONFIG_DTYPES)}; fix config.json")
    return CONFIG_DTYPES[named], ""


def derived_tensors(config: dict) -> tuple[dict[str, TensorInfo], str]:
    """Every tensor of the checkpoint from config.json alone (no weights present): shapes from the architecture
    (qwenquant/model/qwen3.py `checkpoint_shapes`), the dtype config.json names; (tensors, dtype note)."""
    dtype, note = config_dtype(config)
    try:
        shapes = checkpoint_shapes(config)
    except (KeyError, TypeError, ValueError) as err:
        raise BadInputError(f"config.json: cannot derive the tensor shapes ({type(err).__name__}: {err}); "
                            "fix config.json or download the weights") from err
    return {name: TensorInfo(dtype, shape) for name, shape in shapes.items()}, note


@dataclass
class LinearInfo:
    """A decoder Linear the quantizer may replace: full module name, [N out, K in], layer index, name in layer."""

    name: str
    n: int
    k: int
    layer: int
    local: str


@dataclass
class ModelFacts:
    """What the estimate needs to know about the model, from config.json and the safetensors headers."""

    reference: str
    path: str
    architecture: str
    config: dict
    num_layers: int
    hidden: int
    vocab: int
    tied: bool
    max_positions: int
    tensors: dict[str, TensorInfo]
    linears: list[LinearInfo]
    source_bytes: int  # safetensors files on disk
    copied_files_bytes: int  # tokenizer and generation files the output folder gets a copy of
    groups: list[list[LinearInfo]] = field(default_factory=list)  # Linears sharing one input (GPTQ's groups)
    moe: bool = False  # sparse (mixture-of-experts) layers: formats may verify those with their spec reader
    sizes_from: str = "safetensors headers"  # | "hub safetensors headers" | "config.json" (no weights present)
    layers_path: str = "model.layers"  # decoder layer i's tensors are named `{layers_path}.{i}.*`
    notes: list[str] = field(default_factory=list)  # what qualifies the sizes (derived, dtype assumed)

    @property
    def params(self) -> int:
        """Parameters the loaded model holds (a tied lm_head shares the embedding)."""
        return sum(t.numel for n, t in self.tensors.items() if not (self.tied and n == "lm_head.weight"))

    @property
    def linear_params(self) -> int:
        return sum(l.n * l.k for l in self.linears)

    def layer_linear_params(self, i: int = 0) -> int:
        return sum(l.n * l.k for l in self.linears if l.layer == i)

    def layer_params(self, i: int) -> int:
        """Every tensor of decoder layer i (Linears, norms, router)."""
        prefix = f"{self.layers_path}.{i}."
        return sum(t.numel for n, t in self.tensors.items() if n.startswith(prefix))

    @property
    def resident_params(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, lm_head unless tied): what --offload-dir
        keeps in memory."""
        head = self.layers_path + "."
        return sum(t.numel for n, t in self.tensors.items()
                   if not n.startswith(head) and not (self.tied and n == "lm_head.weight"))


def _is_copied_file(f: Path) -> bool:
    """Files of the source folder the output gets a copy of (tokenizer, generation config, config)."""
    return f.is_file() and (f.name.startswith("tokenizer") or f.suffix in (".jinja", ".txt", ".model")
                            or f.name in ("generation_config.json", "config.json"))


def _tensors(resolved) -> tuple[dict[str, TensorInfo], int, str, list[str]]:
    """(tensors, source safetensors bytes, where they come from, notes): the local headers, the hub's headers (a hub
    id not in the cache), or config.json alone (a folder without weights)."""
    if resolved.weight_files:
        tensors: dict[str, TensorInfo] = {}
        for f in resolved.weight_files:
            tensors.update(read_safetensors_header(f))
        return tensors, sum(Path(f).stat().st_size for f in resolved.weight_files), "safetensors headers", []
    if resolved.hub_headers:
        files = {name: _tensor_infos(header) for name, header in resolved.hub_headers.items()}
        tensors = {k: t for file in files.values() for k, t in file.items()}
        return tensors, sum(_file_bytes(f) for f in files.values()), "hub safetensors headers", [HUB_HEADERS_NOTE]
    tensors, dtype_note = derived_tensors(resolved.config)
    return tensors, _file_bytes(tensors), "config.json", [n for n in (NO_WEIGHTS_NOTE, dtype_note) if n]


def model_facts(resolved) -> ModelFacts:
    """Facts of a resolved model (qwenquant.model.loader.ResolvedModel): reads only headers and small files."""
    config = resolved.config
    tensors, source_bytes, sizes_from, notes = _tensors(resolved)
    n_layers = int(config["num_hidden_layers"])
    adapter = resolved.adapter
    linears, groups = [], []
    for i, layer in enumerate(adapter.layers(config, n_layers)):  # MoE layers have their own adapter
        by_local = {}
        for local in layer.linears:
            name = f"{adapter.layers_path}.{i}.{local}"
            t = tensors.get(name + ".weight")
            if t is not None and len(t.shape) == 2:
                by_local[local] = LinearInfo(name, int(t.shape[0]), int(t.shape[1]), i, local)
        linears += by_local.values()
        groups += [[by_local[n] for n in g if n in by_local] for g in layer.sequential_groups]
    return ModelFacts(
        reference=resolved.reference, path=str(resolved.path),
        architecture=(config.get("architectures") or ["?"])[0], config=config, num_layers=n_layers,
        hidden=int(config["hidden_size"]), vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings", 2048)), tensors=tensors, linears=linears,
        source_bytes=source_bytes,
        copied_files_bytes=sum(f.stat().st_size for f in Path(resolved.path).iterdir() if _is_copied_file(f)),
        groups=[g for g in groups if g], moe=adapter.moe is not None, sizes_from=sizes_from, notes=notes,
        layers_path=adapter.layers_path,
    )


@dataclass
class RunShape:
    """The token counts a run processes."""

    calib_tokens: int  # num_samples x seq_len (0 when no stage needs calibration data)
    seq_len: int
    window: int  # evaluation window (capped at max positions)
    ppl_windows: int
    kl_windows: int
    text_tokens: int  # evaluation text, estimated
    text_note: str = ""
    calib_samples: int = 0  # calibration samples (the loop forwards them in batches)

    @property
    def kl_tokens(self) -> int:
        return self.kl_windows * self.window


def run_shape(recipe, facts: ModelFacts, text_tokens: int, needs_calibration: bool, text_note: str = "") -> RunShape:
    """Windows and tokens as the runner computes them."""
    ev = recipe.eval
    window = min(ev.window, facts.max_positions)
    n_text = max(text_tokens // window, 1)
    ppl = (min(ev.max_windows, n_text) if ev.max_windows else n_text) if ev.perplexity else 0
    kl = min(max(1, math.ceil(ev.kl_tokens / window)), n_text) if ev.kl_tokens else 0  # 0: --kl-tokens 0, no KL
    calib = recipe.calibration.num_samples * recipe.calibration.seq_len if needs_calibration else 0
    return RunShape(calib, recipe.calibration.seq_len, window, ppl, kl, text_tokens, text_note,
                    recipe.calibration.num_samples)


def _count_tokens(sample: str, tokenizer_dir: str | Path, model: str) -> int:
    """Tokens of `sample` with the model's tokenizer; one that does not load fails as it does in the run."""
    from transformers import AutoTokenizer  # heavy: only when a text is really counted

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as err:  # the loader's message for the same failure (qwenquant/model/loader.py)
        raise BadInputError(f"--model {model}: tokenizer could not be loaded ({err})") from err
    return len(tok(sample, add_special_tokens=False)["input_ids"])


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder has tokenizer files (a folder holding only config.json has none)."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def eval_tokens(eval_text: str, tokenizer_dir: str | Path, model: str = "") -> tuple[int, str]:
    """(tokens of the evaluation text, a note when they are assumed): exact for short texts, else measured on its
    first 200k characters and scaled to its length (within ~1%); WikiText-2 not found locally is assumed at its known
    length; without a tokenizer (a folder holding only config.json) the text's length in characters is divided by
    CHARS_PER_TOKEN."""
    from qwenquant.eval.perplexity import find_wikitext2_test

    if eval_text == "wikitext2":
        path = find_wikitext2_test()
        if path is None:
            return (int(WIKITEXT2_TEST_CHARS / CHARS_PER_TOKEN),
                    "WikiText-2 test not found locally (the run loads it from the hub): its token count is assumed")
        text = "\n\n".join(path.read_text(encoding="utf-8").split("\n"))
    else:
        path = Path(eval_text).expanduser()
        if not path.is_file():
            raise BadInputError(f"--eval-text {eval_text}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
    if not has_tokenizer(tokenizer_dir):  # sized before download: the run loads the tokenizer with the weights
        note = (f"no tokenizer in {tokenizer_dir}: evaluation tokens estimated from the text's {len(text)} "
                f"characters at {CHARS_PER_TOKEN} characters per token")
        return int(len(text) / CHARS_PER_TOKEN), note
    sample = text[:TOKENIZER_SAMPLE_CHARS]
    n = _count_tokens(sample, tokenizer_dir, model or str(tokenizer_dir))
    if len(sample) == len(text):  # the whole text: exact
        return n, ""
    return int(n * len(text) / max(len(sample), 1)), ""
