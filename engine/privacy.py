"""Private files: what the engine writes is readable by its owner only, whatever the umask.

The state directory holds alert labels, saved plans with device evidence, approvals and who
decided them, and every playbook's output.  Directories the engine makes are ``0700`` and
files ``0600``, set explicitly (a umask only takes bits away, and the caller's may be ``0``);
a state directory left readable by others by an older version, a copy or a ``chmod`` is
tightened, all of it, when a command or the server starts (:func:`private_state_dir`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import StateError

#: Mode bits for group and others: none of them on anything private.
_SHARED = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
#: The umask of the entry points (CLI, server): what they and their children create, and
#: nothing set a mode for, is the owner's only.
PRIVATE_UMASK = 0o077


def _loose(mode: int) -> bool:
    return bool(mode & _SHARED)


def private_dir(path: Path) -> Path:
    """Make ``path`` (and the missing folders above it) owner-only, or tighten it; return it."""
    missing: list[Path] = []
    here = path
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            folder.mkdir(mode=PRIVATE_DIR)
        folder.chmod(PRIVATE_DIR)
    mode = path.stat().st_mode
    if _loose(mode):
        path.chmod(stat.S_IMODE(mode) & ~_SHARED)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty and owner-only if missing, else tighten it; return it.

    A file made this way before a library opens it keeps the mode the library would
    otherwise pick (SQLite gives its write-ahead log and shared memory the database's mode).
    A path that cannot be opened (a folder, no permission) is left for that library to
    report, in its own words.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    except OSError:
        return path
    try:
        mode = os.fstat(fd).st_mode
        if _loose(mode):
            os.fchmod(fd, stat.S_IMODE(mode) & ~_SHARED)
    finally:
        os.close(fd)
    return path


def write_private(path: Path, text: str | Iterable[str]) -> None:
    """Write ``text`` to ``path`` owner-only and atomically (a file beside it, then renamed).

    ``text`` may be pieces written one after the other (a large file never held whole).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # a leftover temporary file keeps its own mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            if isinstance(text, str):
                handle.write(text)
            else:
                handle.writelines(text)
    finally:
        if fd >= 0:
            os.close(fd)
    tmp.replace(path)


def tighten_tree(root: Path) -> tuple[int, int]:
    """Take group and other bits off every folder and file under ``root`` (not ``root``).

    Symbolic links are neither changed nor followed.  Returns how many entries were
    tightened and how many could not be (not ours to change).
    """
    tightened = failed = 0
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            try:
                if _tighten(Path(directory, name)):
                    tightened += 1
            except FileNotFoundError:  # gone meanwhile (a write-ahead log, a temporary file)
                continue
            except OSError:
                failed += 1
    return tightened, failed


def _tighten(path: Path) -> bool:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not _loose(info.st_mode):
        return False
    path.chmod(stat.S_IMODE(info.st_mode) & ~_SHARED)
    return True


def _loose_entry(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return _loose(info.st_mode) and not stat.S_ISLNK(info.st_mode)


@dataclass(frozen=True)
class Tightened:
    """A state directory that was readable by others, and what was done about it."""

    path: Path
    mode: int  # the directory's mode before
    entries: int  # folders and files tightened
    failed: int  # entries that could not be tightened

    def warning(self) -> str:
        """The one line a command or the server prints about it."""
        left = f"; {self.failed} could not be changed" if self.failed else ""
        return (
            f"warning: the state directory {self.path} (mode {self.mode:04o}) or files in it "
            f"were readable by other users: made {self.entries} entries owner-only{left}"
        )


def private_state_dir(state_dir: Path) -> Tightened | None:
    """Create the state directory owner-only, or check it; tighten it if it was not private.

    It is not private when the directory itself or one of its entries (the audit log, the
    database, ``artifacts/``…) lets group or others in; then everything under it is
    tightened, once, and the result says so.  A directory that cannot be made private (not
    ours) is a :class:`~engine.errors.StateError`.
    """
    try:
        existed = state_dir.exists()
        mode = stat.S_IMODE(state_dir.stat().st_mode) if existed else PRIVATE_DIR
        private_dir(state_dir)
    except OSError as exc:
        raise StateError(
            f"{state_dir}: cannot make the state directory private: {exc.strerror}"
        ) from exc
    if not existed:
        return None
    if not _loose(mode) and not any(_loose_entry(e) for e in state_dir.iterdir()):
        return None
    tightened, failed = tighten_tree(state_dir)
    return Tightened(
        path=state_dir,
        mode=mode,
        entries=tightened + (1 if _loose(mode) else 0),
        failed=failed,
    )
