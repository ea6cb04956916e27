"""Writing outputs safely: all of a command's files appear together, complete, or not at all.

* :class:`Outputs` collects every file and directory one command writes. Each is written under a
  temporary sibling name; :meth:`Outputs.commit` renames them into place together, and any
  failure or interrupt before that removes every temporary. An existing output is replaced only
  with ``overwrite``, and only after everything new is complete.
* No output may be, contain or lie inside an input: :func:`check_separate` refuses that before any
  work starts (``--overwrite`` would otherwise destroy the source it is converting).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import OutputExistsError, ZptrError

PathLike = Union[str, Path]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_file(path: PathLike, error: type[ZptrError], missing: str, not_a: str) -> Path:
    """``path`` as a Path when it is a file; otherwise ``error``: ``"<path>: <missing>"`` when
    nothing is there, ``"<path>: is a directory, not <not_a>"`` when something else is."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}" if not path.exists() else f"{path}: is a directory, not {not_a}")
    return path


def check_separate(inputs: Iterable[Optional[PathLike]], outputs: Iterable[Optional[PathLike]]) -> None:
    """Refuse an output that is an input, lies inside an input directory, or contains an input."""
    resolved_inputs = [Path(p).resolve() for p in inputs if p is not None]
    for output in (Path(p) for p in outputs if p is not None):
        target = output.resolve()
        for source in resolved_inputs:
            if _inside(target, source) or _inside(source, target):
                relation = ("is" if target == source else "lies inside" if _inside(target, source)
                            else "contains")
                raise ZptrError(f"output {output} {relation} the input {source}: choose an output "
                                "outside every input")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(target: Path, directory: bool, overwrite: bool) -> None:
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError(target)
        if target.is_dir() != directory:
            kind = "a directory" if target.is_dir() else "a file"
            raise ZptrError(f"{target} is {kind}; cannot replace it with {'a directory' if directory else 'a file'}")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ZptrError(f"{target}: {parent} is a file, not a directory")
            break


@dataclass
class _Entry:
    target: Path
    temp: Path
    directory: bool


class Outputs:
    """The outputs of one command, written under temporary names and committed together.

    ::

        with Outputs(overwrite) as out:
            model_tmp = out.file(model_path)
            export_tmp = out.directory(export_dir)
            ...                      # write into the temporaries
        # leaving the block without an exception renames both into place
    """

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self._entries: list[_Entry] = []
        self._made_dirs: list[Path] = []

    def _prepare(self, target: PathLike, directory: bool) -> Path:
        target = Path(target)
        if any(e.target.resolve() == target.resolve() for e in self._entries):
            raise ZptrError(f"{target} is named twice as an output")
        _check_target(target, directory, self.overwrite)
        missing = [p for p in reversed(target.parents) if not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs += [p for p in missing if p not in self._made_dirs]
        return target

    def file(self, target: PathLike) -> Path:
        """A temporary file that becomes ``target`` on commit."""
        target = self._prepare(target, directory=False)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        temp = Path(name)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's 0600 would make outputs private
        self._entries.append(_Entry(target, temp, False))
        return temp

    def directory(self, target: PathLike) -> Path:
        """A temporary directory that becomes ``target`` on commit."""
        target = self._prepare(target, directory=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(temp, 0o777 & ~_umask())
        self._entries.append(_Entry(target, temp, True))
        return temp

    def commit(self) -> None:
        """Rename every temporary into place; on any failure put back what was there before."""
        for entry in self._entries:  # checked again: something may have appeared meanwhile
            _check_target(entry.target, entry.directory, self.overwrite)
        placed: list[tuple[_Entry, Optional[Path]]] = []
        try:
            for entry in self._entries:
                backup = None
                if entry.target.exists() or entry.target.is_symlink():
                    backup = entry.target.with_name(f".{entry.target.name}.{os.getpid()}.old")
                    _remove(backup)
                    os.rename(entry.target, backup)
                placed.append((entry, backup))
                os.rename(entry.temp, entry.target)
        except BaseException:
            for entry, backup in reversed(placed):
                if not entry.temp.exists() and entry.target.exists():
                    os.rename(entry.target, entry.temp)
                if backup is not None:
                    os.rename(backup, entry.target)
            raise
        for _, backup in placed:
            if backup is not None:
                _remove(backup)
        self._entries, self._made_dirs = [], []

    def discard(self) -> None:
        """Remove every temporary and every directory this set created."""
        for entry in self._entries:
            _remove(entry.temp)
        for directory in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: never a directory someone else filled
        self._entries, self._made_dirs = [], []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: PathLike, overwrite: bool = True) -> Iterator[Path]:
    """One output file: yields its temporary, renamed onto ``path`` on success."""
    with Outputs(overwrite) as outputs:
        yield outputs.file(path)


def atomic_directory(target: PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """One output directory, filled by ``write(tmpdir)`` and renamed into place on success."""
    with Outputs(overwrite) as outputs:
        write(outputs.directory(target))
    return Path(target)
