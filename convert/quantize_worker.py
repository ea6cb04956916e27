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
from typing import Union


def _set_str(slot, value: str) -> None:
    import llama_cpp

    slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
    # llama.cpp keeps 127 bytes of a string override (llama-quantize truncates the same way);
    # cut on a character boundary so the stored string stays valid UTF-8.
    slot.value.val_str = value.encode()[:127].decode("utf-8", "ignore").encode()


def _set_int(slot, value: int) -> None:
    import llama_cpp

    slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT  # written to the output as uint32
    slot.value.val_i64 = value


# Python type of an override value -> how its slot is filled (bool is no override type here).
_SETTERS = {str: _set_str, int: _set_int}


def _overrides(values: dict[str, Union[str, int]]):
    """A null-terminated array of llama_model_kv_override setting string and integer keys."""
    import llama_cpp

    overrides = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for slot, (key, value) in zip(overrides, values.items()):
        slot.key = key.encode()
        _SETTERS[type(value)](slot, value)
    return overrides


def _imatrix_array(path: str, recorded_as: str):
    """llama.cpp's C interface for an importance matrix: {name, data, size} entries, then a null
    name; and the quantize.imatrix.* keys llama-quantize records with it. The arrays are kept
    referenced by the returned tuple until the call ends."""
    import llama_cpp
    import numpy as np

    from zptr.formats.imatrix import read_imatrix

    imatrix = read_imatrix(path)
    values = imatrix.means()
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for slot, (name, data) in zip(entries, values.items()):
        array = np.ascontiguousarray(data, dtype=np.float32)
        keep.append(array)
        slot.name = name.encode()
        slot.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = array.size
    keys = imatrix.quantize_keys(recorded_as)
    return entries, keep, keys


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
    kv_overrides = dict(job.get("kv_overrides") or {})
    if job.get("imatrix"):
        entries, arrays, keys = _imatrix_array(job["imatrix"], job.get("imatrix_name") or job["imatrix"])
        keep += [entries, arrays]
        kv_overrides.update(keys)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if kv_overrides:
        overrides = _overrides(kv_overrides)
        keep.append(overrides)
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    status = llama_cpp.llama_model_quantize(job["infile"].encode(), job["outfile"].encode(),
                                            ctypes.byref(params))
    flush()
    return 0 if status == 0 else 3


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
