"""JSONL training data: formats, chat template, bad lines, batching and the data order."""

from __future__ import annotations

import json

import pytest

from zptr.dataset import (IGNORE_INDEX, DatasetError, Example, TokenizedExample, collate,
                          epoch_order, global_batch_indices, read_jsonl, sample_corpus_path, tokenize)

CHAT = [{"role": "user", "content": "What is the golden ratio?"},
        {"role": "assistant", "content": "About 1.618."}]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_messages_and_origin(tmp_path, smollm2_tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"text": "Hello there."}),
        "",
        json.dumps({"messages": CHAT, "origin": "私は先生です。"}, ensure_ascii=False),
    ])
    examples, skipped = read_jsonl(path, smollm2_tokenizer)
    assert skipped == 0
    assert examples[0] == Example("Hello there.", None, chat=False)
    assert examples[1].text == smollm2_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert examples[1].chat and examples[1].origin == "私は先生です。"


def test_chat_text_gets_no_second_set_of_special_tokens(smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template(CHAT, tokenize=False)
    [chat] = tokenize([Example(text, chat=True)], smollm2_tokenizer, max_length=512)
    assert chat.input_ids == smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    [plain] = tokenize([Example("word " * 100)], smollm2_tokenizer, max_length=16,
                       default_origin="an origin")
    assert len(plain.input_ids) == 16 and plain.origin_ids  # truncated; default origin applied


@pytest.mark.parametrize("line, reason", [
    ('{"text": "ok"', "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "x"}', "needs a 'text' or a 'messages'"),
    ('{"text": ""}', "'text' must be a non-empty string"),
    ('{"text": "a", "messages": []}', "has both 'text' and 'messages'"),
    ('{"messages": [{"role": "user"}]}', "messages[0] needs string 'role' and 'content'"),
    ('{"text": "a", "origin": 3}', "'origin' must be a non-empty string"),
])
def test_bad_line_names_its_number(tmp_path, smollm2_tokenizer, line, reason):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "fine"}', '{"text": "fine"}', line])
    with pytest.raises(DatasetError) as err:
        read_jsonl(path, smollm2_tokenizer)
    assert f"d.jsonl:3: {reason}" in str(err.value)
    examples, skipped = read_jsonl(path, smollm2_tokenizer, skip_bad_lines=True)
    assert (len(examples), skipped) == (2, 1)


def test_missing_empty_and_non_utf8_files(tmp_path, smollm2_tokenizer):
    with pytest.raises(DatasetError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl", smollm2_tokenizer)
    with pytest.raises(DatasetError, match="no usable examples"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", [""]), smollm2_tokenizer)
    with pytest.raises(DatasetError, match="1 bad lines skipped"):
        read_jsonl(write_lines(tmp_path / "bad.jsonl", ["{"]), smollm2_tokenizer, skip_bad_lines=True)
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"latin1.jsonl:2: not UTF-8"):
        read_jsonl(binary, smollm2_tokenizer)


def test_messages_need_a_chat_template(tmp_path, smollm2_tokenizer):
    tokenizer = type(smollm2_tokenizer).from_pretrained(smollm2_tokenizer.name_or_path)
    tokenizer.chat_template = None
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": CHAT})])
    with pytest.raises(DatasetError, match="d.jsonl:1: 'messages' needs a tokenizer with a chat template"):
        read_jsonl(path, tokenizer)


def test_collate_pads_right_and_masks_labels():
    batch = collate([TokenizedExample([5, 6, 7]), TokenizedExample([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_data_order_is_a_pure_function_of_the_position():
    n, batch, seed = 7, 3, 11
    stream = [i for step in range(7) for i in global_batch_indices(step * batch, batch, n, seed)]
    # Every epoch visits each example once; consecutive epochs are shuffled differently.
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    assert list(epoch_order(n, 0, seed)) != list(epoch_order(n, 1, seed))
    # Resuming at any position reads exactly what the uninterrupted stream reads.
    assert global_batch_indices(5, 4, n, seed) == stream[5:9]


def test_sample_corpus_is_bilingual_and_valid(smollm2_tokenizer):
    examples, skipped = read_jsonl(sample_corpus_path(), smollm2_tokenizer)
    assert skipped == 0 and len(examples) >= 200
    japanese = [e for e in examples if any("\u3040" <= ch <= "\u30ff" for ch in e.text)]
    assert 50 <= len(japanese) <= len(examples) - 50  # both languages well represented
    assert sum(e.chat for e in examples) >= 20 and sum(bool(e.origin) for e in examples) >= 20
