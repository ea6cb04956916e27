"""``--export-hf DIR``: the merged, folded model as a plain HF directory for transformers/vLLM/TGI.

Weights are streamed into one safetensors file (header first, then each tensor as it is
produced), so the export needs no more memory than the GGUF path. The head is untied
(``tie_word_embeddings: false``) whenever the folded lm_head differs from the embedding.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

from tqdm import tqdm

from .merge import EMBED, LM_HEAD, MergedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")


def _write_safetensors(path: Path, model: MergedModel, progress: bool) -> None:
    """The safetensors layout: u64 header size, JSON header, then float32 tensors back to back."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = model.names()
    for name in names:
        shape = list(model.shape(name))
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name in tqdm(names, desc="exporting HF weights", unit="tensor", disable=not progress):
            handle.write(model.tensor(name).contiguous().numpy().tobytes())


def _copy_tokenizer(source: Path, out: Path) -> None:
    """Tokenizer files of a HF directory, or the tokenizer of a GGUF base saved by transformers."""
    source = Path(source)
    if source.is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name).save_pretrained(str(out))
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def export_hf(model: MergedModel, tokenizer_source: Path, out_dir: Path, progress: bool = True) -> Path:
    """Write config, weights and tokenizer files into ``out_dir`` (the caller's temporary
    directory, committed with the conversion's other outputs)."""
    out_dir = Path(out_dir)
    config = model.config.to_dict()
    config["tie_word_embeddings"] = LM_HEAD not in model.names()
    config["vocab_size"] = model.shape(EMBED)[0]  # resized when fine-tuning added tokens
    config["dtype"] = "float32"
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(out_dir / "model.safetensors", model, progress)
    _copy_tokenizer(tokenizer_source, out_dir)
    return out_dir
