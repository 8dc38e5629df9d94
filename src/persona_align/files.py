"""Paths the user names: inputs that must be files, outputs checked before any work, caches.

A command checks every output before its first model call, so a typo in ``-o`` costs a second,
not an hour of generation. Writability is probed with a real file: permission bits say nothing
for root, read-only mounts or immutable folders.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

from persona_align.errors import InputError


def require_file(path: str | Path) -> Path:
    """``path`` if it is an existing file (or a link to one); otherwise a one-line InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file")
    if not path.exists():
        raise InputError(path, "file does not exist")
    return path


def _probe_folder(path: Path, folder: Path) -> None:
    """Create and remove a file in ``folder``, or in its nearest existing parent when it does not
    exist yet (creating nothing on the way); errors name the output ``path``."""
    while not folder.exists():  # Path.exists is False below a regular file, too
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(path, f"cannot be created: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".persona-align-probe.", dir=folder)
    except OSError as err:
        raise InputError(path, f"cannot be written: {folder}: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work, an output file that could not be written at the end."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file to write")
    _probe_folder(path, path.parent)
    return path


def check_output_folder(path: str | Path) -> Path:
    """Refuse, before any work, an output folder that could not be created or written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "is a file, expected a folder to write in")
    _probe_folder(path, path)
    return path


def open_sqlite(path: str | Path) -> sqlite3.Connection:
    """A cache database in WAL mode (a reader may look while a run writes); a path that cannot
    hold one is bad input, reported in one line."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as err:
        db.close()
        raise InputError(path, f"not a usable SQLite cache ({err})") from None
    return db


def write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Make ``out`` atomically: ``fill(tmp)`` writes everything into a temporary folder beside
    it, which then replaces ``out``; a crash leaves no half folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shipped or shared folder unreadable
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
