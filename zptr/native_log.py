"""llama.cpp's own log lines, through one setup for every subcommand.

llama.cpp logs from C through a callback. By default ZPTR keeps them quiet: lines of a known
repetitive kind are counted and summarised in one line each at the end (for example
``180 of 273 tensors fell back to q5_0 / q8_0: rows of 576 are not multiples of 256``), other
warnings and errors pass through, information is dropped. ``-v`` / ``--verbose`` passes
everything through as llama.cpp wrote it.

The same :class:`NativeLog` reads the stderr of the child process that runs llama.cpp's quantizer
(``zptr.convert.quantize``), so a conversion's summary looks like an in-process one.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TextIO

# ggml_log_level (ggml.h of the pinned llama.cpp): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4,
# CONT 5 (continues the previous line). llama-cpp-python's own callback maps an older numbering.
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5

_FALLBACK = re.compile(r"ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r".*falling back to\s+(\S+)")
_FALLBACK_TOTAL = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
# Warnings about what ZPTR asks for on purpose: pooling NONE and every token an output are how
# the runtime reads h_t for Omega. Shown only with --verbose.
_EXPECTED = re.compile(r"model default pooling_type is|embeddings required but some input tokens "
                       r"were not marked as outputs")


@dataclass
class NativeLog:
    """Collects llama.cpp log text; ``verbose`` passes it through, otherwise it is summarised."""

    verbose: bool = False
    out: TextIO = field(default_factory=lambda: sys.stderr)
    fallbacks: Counter = field(default_factory=Counter)  # (ncols, block, fallback type) -> tensors
    tensors: Optional[int] = None  # tensors the quantizer went through, when it said
    _line: str = ""
    _level: int = INFO
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, level: int, text: str) -> None:
        """One fragment as llama.cpp emits it (lines may arrive in pieces)."""
        with self._lock:
            if self.verbose:
                self.out.write(text)
                return
            if level != CONT:
                self._level = level
            self._line += text
            while "\n" in self._line:
                line, self._line = self._line.split("\n", 1)
                self._classify(self._level, line)

    def _classify(self, level: int, line: str) -> None:
        fallback = _FALLBACK.search(line)
        if fallback:
            ncols, block, _, to_type = fallback.groups()
            self.fallbacks[(int(ncols), int(block), to_type)] += 1
            return
        total = _FALLBACK_TOTAL.search(line)
        if total:
            self.tensors = int(total.group(2))
            return
        if level in (WARN, ERROR) and line.strip() and not _EXPECTED.search(line):
            self.out.write(line + "\n")

    def summary(self) -> list[str]:
        if not self.fallbacks:
            return []
        count = sum(self.fallbacks.values())
        of = f" of {self.tensors}" if self.tensors else ""
        types = " / ".join(sorted({to for _, _, to in self.fallbacks}))
        widths = "; ".join(f"rows of {n} are not multiples of {b}"
                           for n, b in sorted({(n, b) for n, b, _ in self.fallbacks}))
        return [f"{count}{of} tensors fell back to {types}: {widths}"]

    def flush(self) -> None:
        with self._lock:
            if self._line.strip() and not self.verbose:
                self._classify(self._level, self._line)
            self._line = ""
            for line in self.summary():
                self.out.write(f"llama.cpp: {line}\n")
            self.fallbacks.clear()
            self.tensors = None


_current: Optional[NativeLog] = None
_callback = None  # the ctypes callback must outlive every call into llama.cpp


def current() -> NativeLog:
    """The active log (a quiet default outside :func:`native_log`)."""
    global _current
    if _current is None:
        _current = NativeLog()
    return _current


def install() -> None:
    """Route llama.cpp's log callback to :func:`current` (once per process, when llama_cpp is
    first needed; llama-cpp-python's own callback would print or drop by its logger level)."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        current().feed(level, text.decode("utf-8", "replace"))

    _callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def native_log(verbose: bool = False, out: Optional[TextIO] = None) -> Iterator[NativeLog]:
    """The log for one command; its summary is printed when the command ends."""
    global _current
    previous = _current
    _current = NativeLog(verbose=verbose, out=out or sys.stderr)
    try:
        yield _current
    finally:
        _current.flush()
        _current = previous


class _Relay(NativeLog):
    """In a child process: every complete line to stderr as ``<level>|<text>``."""

    def _classify(self, level: int, line: str) -> None:
        self.out.write(f"{level}|{line}\n")
        self.out.flush()


def relay_to_stderr() -> Callable[[], None]:
    """Install the relay in a child process; returns its flush."""
    global _current
    _current = _Relay(verbose=False, out=sys.stderr)
    install()
    return _current.flush


def feed_relayed(log: NativeLog, line: str) -> None:
    """One line of a child's stderr: a relayed llama.cpp line, or anything else the child printed
    (shown as a warning: it may explain a failure)."""
    level, sep, text = line.rstrip("\n").partition("|")
    if sep and level.isdigit():
        log.feed(int(level), text + "\n")
    else:
        log.feed(WARN, line if line.endswith("\n") else line + "\n")
