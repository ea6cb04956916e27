"""The child process that runs llama.cpp's quantizer (``python -m zptr.convert.quantize_worker``).

``llama_model_quantize`` is one long native call: a signal cannot interrupt it inside the
calling process. Run here, the parent can stop it on Ctrl-C or SIGTERM at once (it kills this
process and removes the partial output). The one argument is a JSON job (see
:func:`zptr.convert.quantize.llama_quantize`); llama.cpp's log lines go to stderr, each prefixed
with its log level, for the parent's :class:`~zptr.native_log.NativeLog`.
"""

from __future__ import annotations

import ctypes
import json
import sys


def _overrides(values: dict[str, str]):
    """A null-terminated array of llama_model_kv_override setting string keys."""
    import llama_cpp

    overrides = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for slot, (key, value) in zip(overrides, values.items()):
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        slot.key = key.encode()
        slot.value.val_str = value.encode()
    return overrides


def _imatrix_array(path: str):
    """llama.cpp's C interface for an importance matrix: {name, data, size} entries, then a null
    name. The arrays are kept referenced by the returned tuple until the call ends."""
    import llama_cpp
    import numpy as np

    from zptr.formats.imatrix import read_imatrix

    values = read_imatrix(path).means()
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for slot, (name, data) in zip(entries, values.items()):
        array = np.ascontiguousarray(data, dtype=np.float32)
        keep.append(array)
        slot.name = name.encode()
        slot.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = array.size
    return entries, keep


def run(job: dict) -> int:
    import llama_cpp

    from zptr.native_log import relay_to_stderr

    flush = relay_to_stderr()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = job.get("threads", 0)
    if job.get("embedding_type") is not None:
        params.token_embedding_type = job["embedding_type"]
    keep = []
    if job.get("kv_overrides"):
        overrides = _overrides(job["kv_overrides"])
        keep.append(overrides)
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if job.get("imatrix"):
        entries, arrays = _imatrix_array(job["imatrix"])
        keep += [entries, arrays]
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    status = llama_cpp.llama_model_quantize(job["infile"].encode(), job["outfile"].encode(),
                                            ctypes.byref(params))
    flush()
    return 0 if status == 0 else 3


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
