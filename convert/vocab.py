"""The tokenizer of a HF directory -> GGUF tokenizer keys, in llama.cpp's terms.

Three kinds of tokenizer become two llama.cpp vocabularies:

* SentencePiece from ``tokenizer.model`` -> ``llama`` (pieces, scores, piece types);
* SentencePiece-style BPE from ``tokenizer.json`` alone (byte fallback, ``▁`` for spaces, as
  transformers' fast tokenizers save the Llama-2, Mistral and Gemma families) -> ``llama`` too:
  llama.cpp's SentencePiece tokenizer merges the adjacent pair whose union scores highest, so
  each token's score is minus the rank of the first merge that makes it — the order in which the
  HF BPE applies its merges;
* byte-level BPE (``tokenizer.json``) -> ``gpt2``, with merges and the pre-tokenizer named by the
  split rule it reproduces (:data:`PRE_TOKENIZERS`).

Added tokens (also those added during fine-tuning, at ids past the base vocabulary) keep their
ids as CONTROL (special) or USER_DEFINED tokens; embedding rows beyond the tokenizer (a resized,
padded embedding) get UNUSED placeholders. Special token ids, add-BOS/EOS flags and the chat
template (``tokenizer_config.json`` or ``chat_template.jinja``) come from gguf-py's
``SpecialVocab``; the end-of-turn token llama.cpp stops at is written as ``eot_token_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gguf

from zptr.errors import ConvertError
from zptr.families import SPLIT_RULES
from zptr.jsonio import read_json

# llama.cpp pre-tokenizer names keyed by the HF pre-tokenizer they reproduce, each step as
# (type, the setting that distinguishes it).
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    **{(("Split", rule), ("ByteLevel", False)): name for name, rule in SPLIT_RULES.items()},
}
# Texts of the tokens that end a chat turn (Llama 3, ChatML / Qwen, Gemma, Phi-3 / Phi-4):
# llama.cpp stops generation at them.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
SPM_SPACE = "\u2581"  # ▁


@dataclass
class Token:
    text: str
    kind: gguf.TokenType
    score: float = 0.0


def _pre_signature(spec: Optional[dict[str, Any]]) -> tuple:
    if not spec:
        return ()
    if spec.get("type") == "Sequence":
        return tuple(step for item in spec.get("pretokenizers", []) for step in _pre_signature(item))
    setting = {"ByteLevel": lambda s: s.get("use_regex", True),
               "Digits": lambda s: s.get("individual_digits", False),
               "Split": lambda s: s.get("pattern", {}).get("Regex", s.get("pattern", {}).get("String"))}
    return ((spec.get("type"), setting.get(spec.get("type"), lambda s: None)(spec)),)


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any], where: Path) -> str:
    signature = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    try:
        return PRE_TOKENIZERS[signature]
    except KeyError:
        raise ConvertError(f"{where}: unknown BPE pre-tokenizer {signature}; recognised: "
                           f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}") from None


def _added_tokens(directory: Path, spec: Optional[dict]) -> dict[int, Token]:
    """Tokens added on top of the model's vocabulary, by id, from every file transformers uses."""
    found: dict[int, Token] = {}

    def add(token_id: Any, text: Any, special: Any, where: Path) -> None:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0 or not isinstance(text, str):
            raise ConvertError(f"{where}: added token {text!r} has an invalid id {token_id!r}")
        found.setdefault(token_id, Token(text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))

    for entry in (spec or {}).get("added_tokens", []):
        add(entry.get("id"), entry.get("content"), entry.get("special"), directory / "tokenizer.json")
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        config = read_json(config_file)
        decoder = config.get("added_tokens_decoder", {}) if isinstance(config, dict) else {}
        for token_id, entry in (decoder if isinstance(decoder, dict) else {}).items():
            if isinstance(entry, dict) and str(token_id).isdigit():
                add(int(token_id), entry.get("content"), entry.get("special"), config_file)
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        added = read_json(added_file)
        for text, token_id in (added.items() if isinstance(added, dict) else []):
            add(token_id, text, False, added_file)
    return found


def _sentencepiece(model_file: Path) -> tuple[list[Token], dict[str, Any]]:
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    try:
        processor = SentencePieceProcessor(model_file=str(model_file))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except Exception as err:
        raise ConvertError(f"{model_file}: unreadable SentencePiece model ({err})") from None
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE: llama.cpp's SPM tokenizer
        raise ConvertError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} "
                           "is not supported (unigram or bpe)")
    kinds = ((processor.IsUnknown, gguf.TokenType.UNKNOWN), (processor.IsControl, gguf.TokenType.CONTROL),
             (processor.IsUnused, gguf.TokenType.UNUSED), (processor.IsByte, gguf.TokenType.BYTE))
    tokens = [Token(processor.IdToPiece(i), next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL),
                    processor.GetScore(i)) for i in range(processor.vocab_size())]
    return tokens, {"add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
                    "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces}


def _merge_pairs(model: dict[str, Any], where: Path) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges", []):
        if isinstance(merge, str) and merge.count(" ") == 1:
            pairs.append(tuple(merge.split(" ")))
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
            pairs.append(tuple(merge))
        else:
            raise ConvertError(f"{where}: malformed merge {merge!r}")
    return pairs


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the HF tokenizer puts ``▁`` before the text: a Prepend normalizer (Llama 2's
    legacy layout) or a Metaspace pre-tokenizer whose prepend scheme is first / always."""
    def steps(item: Optional[dict], key: str) -> list[dict]:
        if not item:
            return []
        return item.get(key, [item]) if item.get("type") == "Sequence" else [item]

    if any(s.get("type") == "Prepend" and s.get("prepend") == SPM_SPACE
           for s in steps(spec.get("normalizer"), "normalizers")):
        return True
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") in ("first", "always")
               and s.get("add_prefix_space", True) for s in steps(spec.get("pre_tokenizer"), "pretokenizers"))


def _sentencepiece_bpe(spec: dict[str, Any], where: Path) -> tuple[list[Token], dict[str, Any]]:
    """A byte-fallback BPE in SentencePiece style, as llama.cpp's SentencePiece vocabulary."""
    model = spec["model"]
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(_merge_pairs(model, where)):
        rank.setdefault(left + right, index)
    unknown = model.get("unk_token")
    tokens = []
    vocab = model.get("vocab", {})
    by_id = {token_id: text for text, token_id in vocab.items()}
    for token_id in range(len(by_id)):
        if token_id not in by_id:
            raise ConvertError(f"{where}: token ids are not contiguous (id {token_id} missing)")
        text = by_id[token_id]
        if text == unknown:
            kind = gguf.TokenType.UNKNOWN
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(Token(text, kind, -float(rank[text]) if text in rank else 0.0))
    return tokens, {"add_space_prefix": _space_prefix(spec), "remove_extra_whitespaces": False}


def _byte_level_bpe(spec: dict[str, Any], where: Path) -> list[Token]:
    vocab = spec["model"].get("vocab", {})
    by_id = {token_id: text for text, token_id in vocab.items()}
    tokens = []
    for token_id in range(len(by_id)):
        if token_id not in by_id:
            raise ConvertError(f"{where}: token ids are not contiguous (id {token_id} missing)")
        tokens.append(Token(by_id[token_id], gguf.TokenType.NORMAL))
    return tokens


def _with_added(tokens: list[Token], added: dict[int, Token], n_vocab: int, where: Path) -> list[Token]:
    """Added tokens placed at their ids, the rest of the embedding rows as UNUSED placeholders."""
    tokens = list(tokens)
    top = max([len(tokens) - 1, *added])
    if top >= n_vocab:
        raise ConvertError(f"{where}: token id {top} but the model has {n_vocab} embedding rows")
    for token_id in range(len(tokens), n_vocab):
        tokens.append(Token(f"[PAD{token_id}]", gguf.TokenType.UNUSED, -1000.0))
    for token_id, token in added.items():
        present = tokens[token_id]
        if present.kind == gguf.TokenType.UNUSED:
            tokens[token_id] = Token(token.text, token.kind, 0.0)
        elif present.text != token.text:
            raise ConvertError(f"{where}: added token {token.text!r} has id {token_id}, which the "
                               f"vocabulary gives to {present.text!r}")
        elif present.kind == gguf.TokenType.NORMAL:
            present.kind = token.kind
    for token in tokens:  # llama.cpp recognises turn ends by text, but only as control tokens
        if token.text in END_OF_TURN:
            token.kind = gguf.TokenType.CONTROL
    return tokens


def _tokenizer_json(path: Path) -> dict[str, Any]:
    spec = read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ConvertError(f"{path}: not a tokenizers tokenizer.json (no 'model' object)")
    return spec


def write_vocab(w: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    """Tokenizer keys for the tokenizer files found in directory ``source`` (or a GGUF base file)."""
    directory = Path(source)
    if directory.is_file():
        _from_gguf(w, directory, n_vocab)
        return
    json_file = directory / "tokenizer.json"
    spec = _tokenizer_json(json_file) if json_file.is_file() else None
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (directory / name).is_file():
            read_json(directory / name)  # a clear error before gguf-py's reader meets bad JSON
    added = _added_tokens(directory, spec)
    merges = False
    if (directory / "tokenizer.model").is_file():
        tokens, flags = _sentencepiece(directory / "tokenizer.model")
        model, pre, where = "llama", "default", directory / "tokenizer.model"
    elif spec is not None:
        kind = spec["model"].get("type")
        if kind != "BPE":
            raise ConvertError(f"{json_file}: tokenizer model {kind!r} without a tokenizer.model: "
                               "only BPE (byte-level, or SentencePiece-style with byte fallback) converts")
        where = json_file
        if spec["model"].get("byte_fallback"):
            tokens, flags = _sentencepiece_bpe(spec, json_file)
            model, pre = "llama", "default"
        else:
            tokens, flags = _byte_level_bpe(spec, json_file), {}
            model, pre, merges = "gpt2", bpe_pre_tokenizer(spec, json_file), True
    else:
        raise ConvertError(f"{directory}: no tokenizer.model or tokenizer.json to convert")
    tokens = _with_added(tokens, added, n_vocab, where)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list([t.text.encode("utf-8") for t in tokens])
    if model == "llama":
        w.add_token_scores([t.score for t in tokens])
    w.add_token_types([int(t.kind) for t in tokens])
    if "add_space_prefix" in flags:
        w.add_add_space_prefix(flags["add_space_prefix"])
        w.add_remove_extra_whitespaces(flags["remove_extra_whitespaces"])
    end_of_turn = next((i for i, t in enumerate(tokens) if t.text in END_OF_TURN), None)
    if end_of_turn is not None:
        w.add_eot_token_id(end_of_turn)
    special = gguf.SpecialVocab(directory, load_merges=merges, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)


def _from_gguf(w: gguf.GGUFWriter, path: Path, n_vocab: int) -> None:
    """A GGUF base already holds llama.cpp's tokenizer: its ``tokenizer.*`` keys are copied as they are."""
    from zptr.formats.gguf import open_gguf

    reader = open_gguf(path, "base model")
    fields = {key: found for key, found in reader.fields.items() if key.startswith("tokenizer.")}
    if gguf.Keys.Tokenizer.LIST not in fields:
        raise ConvertError(f"{path}: the GGUF base has no tokenizer")
    n_tokens = len(fields[gguf.Keys.Tokenizer.LIST].data)
    if n_tokens != n_vocab:
        raise ConvertError(f"{path}: {n_tokens} tokens but the model has {n_vocab} embedding rows")
    for key, found in fields.items():
        kind = found.types[0]
        sub_type = found.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, found.contents(), kind, sub_type)
