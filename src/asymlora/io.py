"""Atomic writes: a file or directory appears complete or not at all, with the usual umask-based modes.

``tempfile.mkstemp`` creates files with mode 0600 and ``mkdtemp`` directories with 0700, whatever the
umask; a results file or an exported adapter that a server running as another user must read would then
be unreadable to it. Every writer here therefore gives what it publishes the modes an ordinary ``open`` /
``mkdir`` would (0644 / 0755 under the common umask 022) before the rename. docs/design.md §10.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "apply_umask",
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_out_dir",
    "check_target_dir",
    "purge_after_step",
]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (the usual idiom).
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything below it) the modes the umask allows.

    Files get ``0o666 & ~umask``, directories ``0o777 & ~umask``.
    """
    path, mask = Path(path), _umask()
    if not path.is_dir():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for child in path.rglob("*"):
        if not child.is_symlink():
            child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)


def check_target_dir(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """``target`` as a Path, when :func:`atomic_dir` may write it: not a file (even with ``overwrite``: a file
    where a directory is expected is a mistyped path), and empty or absent unless ``overwrite``.

    Raises:
        FileExistsError: naming ``target`` and the fix.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a directory; give the path of a new directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} already exists and is not empty; choose another path or overwrite it."
        )
    return target


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a Path, when an output directory can be made or written there; creates nothing, so a
    command that checks it first and fails later leaves no empty directory behind.

    Raises:
        FileExistsError: ``path``, or a folder on the way to it, is a file.
        ValueError: the nearest existing folder is not writable by this user.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} on the way to it is a file)"
        raise FileExistsError(f"{flag} {path} is not a directory{where}; give the path of a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {path}: {existing} is not writable by this user; give a directory you can write"
        )
    return path


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    On error the temporary directory is removed and ``target`` is untouched. The directory and its files
    get umask-based modes (:func:`apply_umask`) before the rename.

    Raises:
        FileExistsError: ``target`` is a file, or exists, is not empty, and ``overwrite`` is False.
    """
    target = check_target_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create ``path`` by ``write(tmp_path)`` on a temporary sibling, then one rename; returns ``path``.

    For writers that take a file name (e.g. ``safetensors.torch.save_file``). On error the temporary
    file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    return atomic_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_file`)."""
    return atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def purge_after_step(path: str | os.PathLike, step: int) -> int:
    """Drop the lines of the JSON-lines log ``path`` whose ``"step"`` is above ``step`` (rewritten atomically);
    the number dropped (0, and nothing written, when the file is missing or has none). A run resumed from
    its step-``step`` checkpoint calls this on its step logs, so records a killed process wrote after that
    checkpoint do not stand beside the resumed run's own (what TensorBoard's ``purge_step`` does for its
    event files). Lines that are not JSON objects with a numeric ``step`` are kept."""
    p = Path(path)
    if not p.is_file():
        return 0
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not _after(line, step)]
    if len(kept) < len(lines):
        atomic_write_text(p, "".join(kept))
    return len(lines) - len(kept)


def _after(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    value = record.get("step") if isinstance(record, dict) else None
    return isinstance(value, int | float) and not isinstance(value, bool) and value > step
