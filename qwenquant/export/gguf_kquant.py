"""K-quants (Q4_K_M, Q5_K_M, Q6_K): made by llama.cpp's own quantizer, `llama_model_quantize`, through
llama-cpp-python, from a BF16 GGUF of the source, optionally weighted by an importance matrix
(qwenquant/export/gguf_imatrix.py).

Their 256-element super-blocks with 6-bit sub-block scales are not a grid our quantizers produce, so these types
are never written from our INT codes: the input is the unquantized model. `_M` mixes: llama.cpp keeps some tensors
(attn_v, half of ffn_down, the embedding table / output head) at a higher type; the file's tensor types are
counted from the file after quantizing.

The importance matrix goes in as llama.cpp's C structure: a NULL-terminated array of
`llama_model_imatrix_data {name, float *data, size}`, one per GGUF tensor.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from qwenquant.errors import BadInputError
from qwenquant.export.gguf_meta import INSTALL_HINT, llama_cpp_module

# GGUF K-quant name -> llama.cpp's `LLAMA_FTYPE_MOSTLY_*` constant
KQUANT_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def require_llama_cpp(qtype: str):
    """llama_cpp, or BadInputError naming the install step (K-quants need llama.cpp's quantizer)."""
    llama_cpp = llama_cpp_module()
    if llama_cpp is None:
        raise BadInputError(f"--type {qtype.lower()} is made by llama.cpp's quantizer and llama-cpp-python is not "
                            f"installed: {INSTALL_HINT}")
    return llama_cpp


def _imatrix_array(llama_cpp, imatrix: dict[str, torch.Tensor]):
    """(the NULL-terminated ctypes array, the float buffers it points to: keep them alive while it is used)."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(imatrix.items()):
        flat = values.detach().float().cpu().contiguous().numpy()
        arr = (ctypes.c_float * flat.size).from_buffer_copy(flat.tobytes())
        keep.append(arr)
        entries[i].name, entries[i].data, entries[i].size = name.encode(), arr, flat.size
    entries[len(imatrix)].name = None
    return entries, keep


def llama_quantize(src: Path, out: Path, qtype: str, imatrix: dict[str, torch.Tensor] | None = None,
                   threads: int = 0) -> None:
    """Quantize the GGUF `src` into `out` with llama.cpp (`qtype` in KQUANT_TYPES), weighted by `imatrix` when
    given; llama.cpp's log is kept off the terminal. RuntimeError when llama.cpp reports a failure (a bug: the
    BF16 source file is ours)."""
    llama_cpp = require_llama_cpp(qtype)
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANT_TYPES[qtype])
    params.nthread = int(threads)
    keep = None
    if imatrix:
        entries, keep = _imatrix_array(llama_cpp, imatrix)
        params.imatrix = entries
    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    del keep
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {qtype} failed with code {rc}")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds."""
    from qwenquant.export.gguf_meta import gguf_module

    counts: dict[str, int] = {}
    for t in gguf_module().GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
