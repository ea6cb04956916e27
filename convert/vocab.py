"""The tokenizer of a HF directory -> GGUF tokenizer keys (SentencePiece or byte-level BPE).

SentencePiece models (``tokenizer.model``) become llama.cpp's ``llama`` vocabulary with pieces,
scores and piece types; byte-level BPE (``tokenizer.json``) becomes ``gpt2`` with merges and a
pre-tokenizer type recognised from the tokenizer's own pre-tokenizer definition. Special token
ids, add-BOS/EOS flags and the chat template come from gguf-py's ``SpecialVocab``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from .errors import ConvertError

# llama.cpp pre-tokenizer names keyed by the HF pre-tokenizer they reproduce, each step as
# (type, the setting that distinguishes it). Regexes are those of the published tokenizers.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}


def _pre_signature(spec: dict[str, Any] | None) -> tuple:
    if spec is None:
        return ()
    if spec["type"] == "Sequence":
        return tuple(step for item in spec["pretokenizers"] for step in _pre_signature(item))
    setting = {"ByteLevel": lambda s: s.get("use_regex", True),
               "Digits": lambda s: s.get("individual_digits", False),
               "Split": lambda s: s.get("pattern", {}).get("Regex", s.get("pattern", {}).get("String"))}
    return ((spec["type"], setting.get(spec["type"], lambda s: None)(spec)),)


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any], where: Path) -> str:
    signature = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    try:
        return PRE_TOKENIZERS[signature]
    except KeyError:
        raise ConvertError(f"{where}: unknown BPE pre-tokenizer {signature}; recognised: "
                           f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}") from None


def _padded(tokens: list[bytes], scores: list[float], types: list[int], n_vocab: int):
    """Embedding rows beyond the tokenizer get unused placeholder tokens (llama.cpp needs one per row)."""
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _sentencepiece(w: gguf.GGUFWriter, model_file: Path, n_vocab: int) -> None:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2

    try:
        processor = SentencePieceProcessor(model_file=str(model_file))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except Exception as err:
        raise ConvertError(f"{model_file}: unreadable SentencePiece model ({err})") from err
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE: llama.cpp's SPM tokenizer
        raise ConvertError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} "
                           "is not supported (unigram or bpe)")
    kinds = ((processor.IsUnknown, gguf.TokenType.UNKNOWN), (processor.IsControl, gguf.TokenType.CONTROL),
             (processor.IsUnused, gguf.TokenType.UNUSED), (processor.IsByte, gguf.TokenType.BYTE))
    tokens, scores, types = [], [], []
    for i in range(processor.vocab_size()):
        tokens.append(processor.IdToPiece(i).encode("utf-8"))
        scores.append(processor.GetScore(i))
        types.append(next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL))
    if len(tokens) > n_vocab:
        raise ConvertError(f"{model_file}: {len(tokens)} pieces but the model has {n_vocab} embedding rows")
    tokens, scores, types = _padded(tokens, scores, types, n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)


def _bpe(w: gguf.GGUFWriter, tokenizer_file: Path, n_vocab: int) -> None:
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConvertError(f"{tokenizer_file}: tokenizer model {model.get('type')!r} is not byte-level BPE "
                           "and there is no tokenizer.model (SentencePiece) next to it")
    pre = bpe_pre_tokenizer(data, tokenizer_file)
    by_id: dict[int, tuple[str, int]] = {i: (text, gguf.TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= n_vocab:
        raise ConvertError(f"{tokenizer_file}: token id {max(by_id)} but the model has {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(len(by_id)):
        if i not in by_id:
            raise ConvertError(f"{tokenizer_file}: token ids are not contiguous (id {i} missing)")
        text, kind = by_id[i]
        tokens.append(text.encode("utf-8"))
        types.append(kind)
    tokens, _, types = _padded(tokens, [0.0] * len(tokens), types, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)


def _from_gguf(w: gguf.GGUFWriter, path: Path, n_vocab: int) -> None:
    """A GGUF base already holds llama.cpp's tokenizer: its ``tokenizer.*`` keys are copied as they are."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: found for key, found in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise ConvertError(f"{path}: the GGUF base has no tokenizer")
    n_tokens = len(fields["tokenizer.ggml.tokens"].data)
    if n_tokens != n_vocab:
        raise ConvertError(f"{path}: {n_tokens} tokens but the model has {n_vocab} embedding rows")
    for key, found in fields.items():
        kind = found.types[0]
        sub_type = found.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, found.contents(), kind, sub_type)


def write_vocab(w: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    """Tokenizer keys for the tokenizer files found in directory ``source`` (or a GGUF base file)."""
    directory = Path(source)
    if directory.is_file():
        _from_gguf(w, directory, n_vocab)
        return
    if (directory / "tokenizer.model").is_file():
        _sentencepiece(w, directory / "tokenizer.model", n_vocab)
        special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=n_vocab)
    elif (directory / "tokenizer.json").is_file():
        _bpe(w, directory / "tokenizer.json", n_vocab)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    else:
        raise ConvertError(f"{directory}: no tokenizer.model or tokenizer.json to convert")
    special.add_to_gguf(w, quiet=True)
