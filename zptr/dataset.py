"""Training data: JSONL lines of ``{"text": ...}`` or ``{"messages": [...]}``, optional ``"origin"``.

``messages`` lines go through the tokenizer's chat template, so the model trains on exactly the
text it will see at inference. A bad line is an error naming its line number unless the caller
asks to skip bad lines, in which case they are counted.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import DatasetError
from .fileio import check_file, sha256_file
from .jsonio import describe

SAMPLE_CORPUS = "sample_corpus.jsonl"
MIXED_TEXT = "mixed_text.txt"
IGNORE_INDEX = -100  # label value cross-entropy skips (padding)
# The chat roles of a message, here and in zptr serve's requests; "developer" (OpenAI's newer name)
# is a system message to a chat template.
CHAT_ROLES = ("system", "developer", "user", "assistant")
NOT_TEXT = "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), not text"


@dataclass
class Example:
    text: str
    origin: Optional[str] = None
    chat: bool = False  # rendered by the chat template: its special tokens are already in the text


@dataclass
class TokenizedExample:
    input_ids: list[int]
    origin_ids: Optional[list[int]] = None

    @property
    def label_count(self) -> int:
        """Tokens that carry a next-token loss: all but the first."""
        return max(len(self.input_ids) - 1, 0)


def sample_corpus_path() -> Path:
    """The English/Japanese sample corpus shipped with the package."""
    return Path(str(resources.files("zptr") / "data" / SAMPLE_CORPUS))


def mixed_text_path() -> Path:
    """A fixed text of English, Japanese, code and emoji shipped with the package: the held-out
    text of parity tests and of the benchmark's quality columns."""
    return Path(str(resources.files("zptr") / "data" / MIXED_TEXT))


def _check_messages(messages: Any) -> Optional[str]:
    """Why a ``messages`` value is malformed, or None when it is fine (the roles: what
    ``zptr serve`` accepts, :data:`CHAT_ROLES`)."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is not an object"
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return f"messages[{i}] needs string 'role' and 'content'"
        if message["role"] not in CHAT_ROLES:
            return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {describe(message['role'])}"
        if not _is_text(message["content"]):
            return f"messages[{i}].content {NOT_TEXT}"
    return None


def _is_text(value: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_line(line: str, tokenizer) -> Example:
    """One JSONL line to an Example; ValueError with the reason when malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    origin = record.get("origin")
    if origin is not None and (not isinstance(origin, str) or not origin.strip()):
        raise ValueError("'origin' must be a non-empty string when present")
    if origin is not None and not _is_text(origin):
        raise ValueError(f"'origin' {NOT_TEXT}")
    if "text" in record and "messages" in record:
        raise ValueError("has both 'text' and 'messages'; give one")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'text' must be a non-empty string")
        if not _is_text(text):
            raise ValueError(f"'text' {NOT_TEXT}")
        return Example(text, origin)
    if "messages" in record:
        problem = _check_messages(record["messages"])
        if problem:
            raise ValueError(problem)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("'messages' needs a tokenizer with a chat template; this one has none")
        messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]}
                    for m in record["messages"]]
        return Example(tokenizer.apply_chat_template(messages, tokenize=False), origin, chat=True)
    raise ValueError("needs a 'text' or a 'messages' field")


def read_jsonl(path: Union[str, Path], tokenizer, skip_bad_lines: bool = False
               ) -> tuple[list[Example], int]:
    """(examples, number of skipped bad lines). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: training data not found")
    examples, skipped = [], 0
    with open(path, "rb") as handle:  # decoded line by line, so an error names its line
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            try:
                examples.append(parse_line(line, tokenizer))
            except ValueError as err:
                if not skip_bad_lines:
                    raise DatasetError(
                        f"{path}:{lineno}: {err} (pass --skip-bad-lines to skip such lines)") from None
                skipped += 1
    if not examples:
        raise DatasetError(f"{path}: no usable examples" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    return examples, skipped


def tokenize(examples: list[Example], tokenizer, max_length: int,
             default_origin: Optional[str] = None) -> list[TokenizedExample]:
    """Token ids truncated to ``max_length``; an example's own origin wins over the default.

    Chat-templated text already holds its special tokens, so none are added to it twice.
    """
    out = []
    for example in examples:
        ids = tokenizer(example.text, add_special_tokens=not example.chat, truncation=True,
                        max_length=max_length)["input_ids"]
        origin = example.origin or default_origin
        origin_ids = None
        if origin:
            origin_ids = tokenizer(origin, truncation=True, max_length=max_length)["input_ids"]
        out.append(TokenizedExample(ids, origin_ids))
    return out


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding labelled IGNORE_INDEX)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        mask[row, : len(example.input_ids)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fingerprint(path: Union[str, Path]) -> str:
    """sha256 of the data file: a resumed run must read the same data to continue exactly."""
    return sha256_file(Path(path))


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, epoch: int, seed: int) -> tuple[int, ...]:
    """The example order of one epoch, a pure function of (seed, epoch) so resume can rebuild it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=generator).tolist())


def global_batch_indices(position: int, global_batch: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of the global batch starting at data position ``position``.

    The position counts examples consumed since the start of training, across epochs.
    """
    indices = []
    for at in range(position, position + global_batch):
        epoch, offset = divmod(at, num_examples)
        indices.append(epoch_order(num_examples, epoch, seed)[offset])
    return indices


def calibration_ids(path: Union[str, Path], tokenizer) -> list[int]:
    """The token ids of a calibration or evaluation file, one stream.

    ``.jsonl`` is training data: each example tokenized as training tokenizes it (chat template
    applied, special tokens added once), the examples one after another. Any other file is plain
    UTF-8 text tokenized whole, special tokens added as llama-imatrix's ``common_tokenize`` adds
    them (a BOS at the start when the tokenizer adds one).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        examples, _ = read_jsonl(path, tokenizer)
        return [token for example in examples
                for token in tokenizer(example.text, add_special_tokens=not example.chat)["input_ids"]]
    return tokenizer(read_text(path), add_special_tokens=True)["input_ids"]


def read_text(path: Union[str, Path]) -> str:
    """A plain UTF-8 text file with something in it."""
    path = check_data_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DatasetError(f"{path}: empty text")
    return text


def check_chunking(ctx: int, max_chunks: Optional[int]) -> None:
    """Refuse a chunk size or count no chunking can use (before any model is loaded)."""
    if ctx < 2:
        raise DatasetError(f"-c/--ctx-size must be at least 2 tokens, got {ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise DatasetError(f"--chunks must be at least 1, got {max_chunks}")


def check_data_file(path: Union[str, Path]) -> Path:
    """A data file that exists (a clear error before any model is loaded)."""
    return check_file(path, DatasetError, "no such data file", "a data file")


def llama_chunks(ids: list[int], ctx: int, max_chunks: Optional[int], bos: Optional[int],
                 min_chunks: int, where: str) -> list[list[int]]:
    """Chunks as llama-imatrix and llama-perplexity form them: consecutive windows of ``ctx``
    tokens (a shorter tail is dropped), at most ``max_chunks``, the first token of each replaced
    by BOS when the model adds one (``bos``; the token is overwritten, not inserted)."""
    check_chunking(ctx, max_chunks)
    if len(ids) < min_chunks * ctx:
        raise DatasetError(f"{where}: {len(ids)} tokens, fewer than the {min_chunks * ctx} that "
                           f"{min_chunks} chunk{'s' if min_chunks > 1 else ''} of -c {ctx} need "
                           "(give more text or a smaller -c)")
    count = len(ids) // ctx if max_chunks is None else min(max_chunks, len(ids) // ctx)
    chunks = [list(ids[i * ctx:(i + 1) * ctx]) for i in range(count)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks
