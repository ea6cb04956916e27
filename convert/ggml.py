"""ggml's row quantizer and llama.cpp's per-tensor type choice, called in-process via ctypes.

llama-cpp-python binds ``llama_model_quantize`` (GGUF file in, GGUF file out) but not the two
parts it is made of; the converter calls them directly so that merged, folded rows go straight
from memory into the quantized GGUF, with no float intermediate file written and read back:

* :func:`quantize_rows`: ``ggml_quantize_chunk`` (ggml's C API, in ``libggml-base``), the same
  function ``llama_model_quantize`` runs on every row, over threads (ctypes releases the GIL);
  each row's bytes depend on that row (and the importance matrix) only, so the output is
  byte-identical to llama.cpp's quantizer given the same float32 rows.
* :func:`llama_tensor_types`: ``llama_quant_compute_types`` (``src/llama-ext.h``, exported from
  ``libllama`` with C++ linkage, hence the mangled names) runs llama.cpp's own rules, the
  ``llama_tensor_get_type`` that ``llama-quantize`` applies, on a mock model built from the
  hyperparameters. It always assumes no importance matrix, so for the types whose rules look at
  one (:data:`IMATRIX_DEPENDENT_FTYPES`) the caller goes through ``llama_model_quantize`` instead.
"""

from __future__ import annotations

import ctypes
import functools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import gguf
import numpy as np

from zptr.errors import ConvertError
from zptr.native_log import install as install_native_log

Q = gguf.GGMLQuantizationType

# llama.cpp ftypes whose tensor types change when an importance matrix is given
# (llama_tensor_get_type_impl reads qs.has_imatrix for them; compute_types never sets it).
IMATRIX_DEPENDENT_FTYPES = ("iq3_xxs", "iq4_nl", "iq4_xs", "q4_0", "q5_0")

# Itanium-mangled names of llama-ext.h's C++-linkage functions (Linux and macOS builds).
_LLAMA_EXT = {
    "model_from_metadata": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
    "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
    "free": "_Z16llama_quant_freeP19quantize_state_impl",
    "compute_types": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
    "default_type": "_Z28llama_ftype_get_default_type11llama_ftype",
}


class _ModelDesc(ctypes.Structure):
    """llama_quant_model_desc: what the type rules read of a model."""

    _fields_ = [("architecture", ctypes.c_char_p),
                *((name, ctypes.c_uint32) for name in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv",
                                                       "n_expert", "n_embd_head_k", "n_embd_head_v"))]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@dataclass(frozen=True)
class TypeModel:
    """The hyperparameters llama.cpp's type rules depend on (GQA ratio, layer count, 70B)."""

    arch: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int


def _function(lib: ctypes.CDLL, name: str, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


@functools.lru_cache(maxsize=None)
def _ggml() -> ctypes.CDLL:
    """libggml-base from llama-cpp-python's package (the copy libllama itself is linked to)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(folder.glob("*ggml-base*"), key=lambda p: len(p.name))
    if not candidates:
        raise ConvertError(f"llama-cpp-python at {folder.parent} ships no ggml-base library")
    lib = ctypes.CDLL(str(candidates[0]))
    _function(lib, "ggml_quantize_chunk", ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
    _function(lib, "ggml_quantize_requires_imatrix", ctypes.c_bool, ctypes.c_int)
    _function(lib, "ggml_validate_row_data", ctypes.c_bool, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    _function(lib, "ggml_row_size", ctypes.c_size_t, ctypes.c_int, ctypes.c_int64)
    _function(lib, "ggml_init", ctypes.c_void_p, _InitParams)
    _function(lib, "ggml_free", None, ctypes.c_void_p)
    _function(lib, "ggml_tensor_overhead", ctypes.c_size_t)
    _function(lib, "ggml_new_tensor", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
              ctypes.POINTER(ctypes.c_int64))
    _function(lib, "ggml_set_name", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
    return lib


@functools.lru_cache(maxsize=None)
def _llama_ext() -> Optional[dict]:
    """llama-ext.h's type-choice functions, or None where this build does not export them."""
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    if not all(hasattr(lib, symbol) for symbol in _LLAMA_EXT.values()):
        return None
    p = ctypes.c_void_p
    return {
        "model_from_metadata": _function(lib, _LLAMA_EXT["model_from_metadata"], p, ctypes.POINTER(_ModelDesc)),
        "init": _function(lib, _LLAMA_EXT["init"], p, p, p),
        "free": _function(lib, _LLAMA_EXT["free"], None, p),
        "compute_types": _function(lib, _LLAMA_EXT["compute_types"], None, p, ctypes.c_int,
                                   ctypes.POINTER(p), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t),
        "default_type": _function(lib, _LLAMA_EXT["default_type"], ctypes.c_int, ctypes.c_int),
    }


def type_choice_available() -> bool:
    return _llama_ext() is not None


def producible(ftype: int) -> bool:
    """llama.cpp's quantizer makes this ftype (it has a default tensor type for it) and the GGUF
    reader here can name that type. True where the type API is not exported (nothing to ask)."""
    ext = _llama_ext()
    if ext is None:
        return True
    return ext["default_type"](ftype) in {int(t) for t in Q}


_LAYER = re.compile(r"blk\.(\d+)\.")


def llama_order(names: Sequence[str]) -> list[str]:
    """Names in the order llama.cpp's loader keeps tensors (``weight_name_comparer``: layer
    number, non-layer tensors first, then name). The type rules count attn_v and ffn_down
    tensors in this order, so it decides which layers get more bits."""
    def key(name: str) -> tuple[int, str]:
        match = _LAYER.match(name)
        return (int(match.group(1)) if match else -1, name)

    return sorted(names, key=key)


def llama_tensor_types(model: TypeModel, shapes: dict[str, tuple[int, ...]], ftype: int,
                       float_type: Q, token_embedding_type: Optional[int] = None) -> dict[str, Q]:
    """Tensor name -> the type ``llama_model_quantize`` gives it for ``ftype`` (no imatrix).

    ``shapes`` are numpy (row-major) shapes; ``float_type`` is the type a matrix llama.cpp does not
    quantize keeps (what the float input would hold); vectors are float32."""
    ext = _llama_ext()
    if ext is None:
        raise ConvertError("this llama-cpp-python build does not export llama.cpp's quantization type API")
    import llama_cpp

    install_native_log()  # the rules log each fallback type: summarised, as the quantizer's are
    ggml = _ggml()
    names = llama_order(list(shapes))
    desc = _ModelDesc(model.arch.encode(), model.n_embd, model.n_ff, model.n_layer, model.n_head,
                      model.n_head_kv, 0, model.head_dim, model.head_dim)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    llama_model = ext["model_from_metadata"](ctypes.byref(desc))
    if not llama_model:
        raise ConvertError(f"llama.cpp has no quantization rules for architecture {model.arch!r}")
    ctx = ggml.ggml_init(_InitParams(ggml.ggml_tensor_overhead() * (len(names) + 1), None, True))
    state = ext["init"](llama_model, ctypes.byref(params))
    try:
        tensors = (ctypes.c_void_p * len(names))()
        for i, name in enumerate(names):
            shape = shapes[name]
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))  # ggml counts dimensions innermost first
            kind = float_type if len(shape) >= 2 else Q.F32
            tensors[i] = ggml.ggml_new_tensor(ctx, int(kind), len(shape), ne)
            ggml.ggml_set_name(tensors[i], name.encode())
        chosen = (ctypes.c_int * len(names))()
        ext["compute_types"](state, ftype, tensors, chosen, len(names))
    finally:
        ext["free"](state)
        llama_cpp.llama_model_free(llama_model)
        ggml.ggml_free(ctx)
    return {name: Q(value) for name, value in zip(names, chosen)}


def requires_imatrix(qtype: Q) -> bool:
    """ggml cannot quantize to this type without an importance matrix (its own list, narrower than
    the types llama.cpp asks one for: :func:`zptr.convert.quantize.needs_imatrix`)."""
    return bool(_ggml().ggml_quantize_requires_imatrix(int(qtype)))


def row_bytes(qtype: Q, n_per_row: int) -> int:
    return int(_ggml().ggml_row_size(int(qtype), n_per_row))


@functools.lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="zptr-quantize")


def quantize_rows(rows: np.ndarray, qtype: Q, imatrix: Optional[np.ndarray] = None,
                  threads: int = 1, name: str = "tensor") -> np.ndarray:
    """float32 rows (n_rows, n_per_row) -> their ``qtype`` bytes (n_rows, row bytes), as
    ``llama_model_quantize`` makes them, the rows split over ``threads`` threads."""
    ggml = _ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    elif requires_imatrix(qtype):
        raise ConvertError(f"{name}: {qtype.name} needs an importance matrix (--imatrix)")
    out = np.empty((n_rows, row_bytes(qtype, n_per_row)), dtype=np.uint8)
    weights = imatrix.ctypes.data if imatrix is not None else None
    # Several slices per thread: a thread slowed by other work (the converter's producer) leaves
    # less of the block for the last one to finish alone.
    parts = max(1, min(4 * threads, n_rows)) if threads > 1 else 1
    bounds = [n_rows * i // parts for i in range(parts + 1)]

    def run(first: int, last: int) -> bool:
        if last == first:
            return True
        src, dst = rows[first:last].ctypes.data, out[first:last].ctypes.data
        size = ggml.ggml_quantize_chunk(int(qtype), src, dst, 0, last - first, n_per_row, weights)
        return bool(ggml.ggml_validate_row_data(int(qtype), dst, size))

    if parts == 1:
        valid = [run(0, n_rows)]
    else:
        valid = list(_pool(threads).map(run, bounds[:-1], bounds[1:]))
    if not all(valid):
        raise ConvertError(f"{name}: values out of {qtype.name}'s range (its block scales overflow)")
    return out


__all__ = ["IMATRIX_DEPENDENT_FTYPES", "TypeModel", "llama_order", "llama_tensor_types", "producible",
           "quantize_rows", "requires_imatrix", "row_bytes", "type_choice_available"]
