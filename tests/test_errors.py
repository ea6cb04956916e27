"""The one-line error helpers: a library's exception quoted by its first line, a file checked."""

from __future__ import annotations

import pytest

from zptr.errors import DatasetError, error_summary
from zptr.fileio import check_file


def test_error_summary_quotes_the_first_line():
    assert error_summary(ValueError("bad shape\n  at line 3\n")) == "bad shape"
    assert error_summary(KeyError("x"), with_type=True) == "KeyError: 'x'"
    assert error_summary(OSError("y" * 300), 160) == "y" * 160


def test_error_summary_of_an_empty_message_is_empty():
    assert error_summary(RuntimeError()) == ""  # splitlines() of "" is [], never an IndexError
    assert error_summary(RuntimeError(""), 160, with_type=True) == "RuntimeError: "


def test_check_file_tells_missing_from_a_directory(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert check_file(tmp_path / "data.jsonl", DatasetError, "no such data file", "a data file") == \
        tmp_path / "data.jsonl"
    with pytest.raises(DatasetError, match=r"gone\.jsonl: no such data file$"):
        check_file(tmp_path / "gone.jsonl", DatasetError, "no such data file", "a data file")
    with pytest.raises(DatasetError, match=r": is a directory, not a data file$"):
        check_file(tmp_path, DatasetError, "no such data file", "a data file")
