"""Writing outputs safely: all of a command's files appear together, complete, or not at all.

* :class:`Outputs` collects every file and directory one command writes. Each is written under a
  temporary sibling name; :meth:`Outputs.commit` renames them into place together, and any
  failure or interrupt before that removes every temporary. An existing output is replaced only
  with ``overwrite``, and only after everything new is complete.
* A write the system refuses (disk full, read-only or forbidden directory) becomes an
  :class:`~zptr.errors.OutputError` naming the output and the cause, after the temporaries are gone.
* A temporary is named ``.<output name>.<pid>.<random>.tmp``: a run killed with SIGKILL cannot
  remove its own, so the next run writing the same output removes those whose process is gone.
* No output may be, contain or lie inside an input: :func:`check_separate` refuses that before any
  work starts (``--overwrite`` would otherwise destroy the source it is converting).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import OutputError, OutputExistsError, ZptrError

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
    """``path`` as a Path when it is a regular file; otherwise ``error``: ``"<path>: <missing>"``
    when nothing is there, ``"<path>: is a directory, not <not_a>"`` for a directory, and ``"not a
    regular file"`` for a FIFO, device or socket (reading one may block forever)."""
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise error(f"{path}: {missing}")
        kind = f"is a directory, not {not_a}" if path.is_dir() else "not a regular file"
        raise error(f"{path}: {kind}")
    return path


def check_separate(inputs: Iterable[Optional[PathLike]], outputs: Iterable[Optional[PathLike]],
                   may_contain: bool = False) -> None:
    """Refuse an output that is an input, lies inside an input directory, or contains an input
    (unless ``may_contain``: a training run's directory holds the checkpoint it resumes)."""
    resolved_inputs = [Path(p).resolve() for p in inputs if p is not None]
    for output in (Path(p) for p in outputs if p is not None):
        target = output.resolve()
        for source in resolved_inputs:
            if _inside(target, source) or (_inside(source, target) and not may_contain):
                relation = ("is" if target == source else "lies inside" if _inside(target, source)
                            else "contains")
                raise ZptrError(f"output {output} {relation} the input {source}: choose an output "
                                "outside every input")


# Errors of a write that the system refused, when it does not say which file it was writing.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_LOW_SPACE = 1 << 20  # bytes: below this free, a short write is a full disk


def write_failure(err: OSError, targets: list[Path]) -> OutputError:
    """``err``, raised while writing ``targets`` (or their temporaries), as one line naming them and
    the cause. numpy's ``tofile`` reports a short write without errno ("N requested and M
    written"): on a directory with next to no space left that is a full disk."""
    if err.errno is not None:
        cause = os.strerror(err.errno)
        cause = cause[:1].lower() + cause[1:]
    elif any(_free(t.parent) < _LOW_SPACE for t in targets):
        cause = os.strerror(errno.ENOSPC).lower()
    else:
        cause = str(err)
    names = ", ".join(str(t) for t in targets)
    return OutputError(f"cannot write {names}: {cause}")


def _free(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return _LOW_SPACE


# What follows ".<output name>." in a temporary's name: the pid, tempfile's random part, and a
# second one for a scratch directory made next to a temporary (:func:`scratch_prefix`).
_TEMP_TAIL = re.compile(r"^(?P<pid>\d+)\.[a-z0-9_]{8}(\.[a-z0-9_]{8})?\.tmp$")


def scratch_prefix(temp: Path) -> str:
    """The prefix of a scratch file or directory (``tempfile``'s ``prefix``, with ``suffix=".tmp"``)
    made next to the temporary ``temp``: it belongs to the same output and run, so a run killed
    before removing it has it removed by the next, as its temporaries are."""
    return temp.name.removesuffix(".tmp") + "."


def remove_stale_temporaries(target: Path) -> None:
    """Remove the temporaries of ``target`` left by runs that died without cleaning up (SIGKILL,
    power loss): those of its name whose process is gone, or is a newer process under a reused
    pid. Another output's temporaries, and the ``.old`` backups of a replaced output, stay."""
    import psutil

    if not target.parent.is_dir():
        return
    lead = f".{target.name}."
    for path in target.parent.iterdir():
        match = _TEMP_TAIL.match(path.name[len(lead):]) if path.name.startswith(lead) else None
        if match is None:
            continue
        pid = int(match["pid"])
        try:
            alive = psutil.Process(pid).create_time() <= path.lstat().st_mtime + 1
        except (psutil.Error, OSError):
            alive = False
        if not alive:
            _remove(path)


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
        self._made_dirs += [p for p in missing if p not in self._made_dirs]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_failure(err, [target]) from None
        remove_stale_temporaries(target)
        return target

    def _temporary(self, target: PathLike, directory: bool) -> Path:
        target = self._prepare(target, directory)
        options = {"prefix": f".{target.name}.{os.getpid()}.", "suffix": ".tmp", "dir": target.parent}
        try:
            if directory:
                temp = Path(tempfile.mkdtemp(**options))
            else:
                handle, name = tempfile.mkstemp(**options)
                os.close(handle)
                temp = Path(name)
            self._entries.append(_Entry(target, temp, directory))
            # mkstemp's 0600 (mkdtemp's 0700) would make outputs private
            os.chmod(temp, (0o777 if directory else 0o666) & ~_umask())
        except OSError as err:
            raise write_failure(err, [target]) from None
        return temp

    def file(self, target: PathLike) -> Path:
        """A temporary file that becomes ``target`` on commit."""
        return self._temporary(target, directory=False)

    def directory(self, target: PathLike) -> Path:
        """A temporary directory that becomes ``target`` on commit."""
        return self._temporary(target, directory=True)

    def _failure(self, err: OSError) -> Optional[OutputError]:
        """``err`` as an OutputError when it is a refused write of these outputs; None when it is
        about another file (an input that cannot be read is not an output problem)."""
        targets = [e.target for e in self._entries]
        if err.filename is not None:
            named = Path(os.fsdecode(err.filename))
            mine = [e.target for e in self._entries if _inside(named, e.temp) or named == e.target]
            return write_failure(err, mine) if mine else None
        if err.errno is None or err.errno in _WRITE_ERRNOS:
            return write_failure(err, targets) if targets else None
        return None

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
            except BaseException as err:
                self._fail(err)
                raise
        else:
            self._fail(value)

    def _fail(self, err: BaseException) -> None:
        """Remove every temporary; a refused write is raised as the OutputError it is (any other
        exception goes on as it was)."""
        failure = self._failure(err) if isinstance(err, OSError) and not isinstance(err, ZptrError) else None
        self.discard()
        if failure is not None:
            raise failure from None


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
