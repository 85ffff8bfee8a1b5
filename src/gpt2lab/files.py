"""Writing files so that a reader never sees half of one, and telling a file from a damaged copy."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temp_path)`, then move the result to `path` in one step."""
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp_name))
        # mkstemp makes the file private; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digest_problem(path: Path, expected: str | None, record: str) -> str | None:
    """What is wrong with `path` against the sha256 that the file `record` (e.g. dataset.json)
    lists for it: None where it matches or where none is listed (a folder written before digests
    were recorded)."""
    if expected is None or file_sha256(path) == expected:
        return None
    return f"{path}: its sha256 differs from the one {record} records"


LOCK_FILE = ".gpt2lab.lock"


class FolderLock:
    """An exclusive hold on a folder by this process, released at `release()` or when the process
    dies (the kernel drops a dead process's flock), so a stale lock file is simply taken over."""

    def __init__(self, folder: Path, what: str):
        """Take the lock, creating the folder; `what` names the folder in messages (e.g. "run folder")."""
        from .errors import UserError

        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {folder} is a file; name a folder (new, or one of this run) instead")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self._handle = open(self.path, "a+", encoding="utf-8")
        try:
            _flock(self._handle)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise UserError(
                f"{what} {folder} is in use by another gpt2lab process (pid {holder}); wait for it to end or "
                "stop it, or choose another folder"
            ) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"{os.getpid()}\n")
        self._handle.flush()

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def _flock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; the folder goes unguarded
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
