"""Private files: folders 0700 and files 0600 whatever the umask; loose state is tightened once."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import StateError
from engine.privacy import private_dir, private_file, private_state_dir, write_private


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask while the test runs."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_folders_and_files_are_owner_only_under_an_open_umask(tmp_path: Path) -> None:
    """New folders (with the missing ones above them) are 0700, new files 0600."""
    deep = private_dir(tmp_path / "a" / "b" / "c")
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", deep)] == [0o700] * 3
    db = private_file(deep / "state.db")
    assert (_mode(db), db.stat().st_size) == (0o600, 0)
    write_private(deep / "plan.json", "{}\n")
    assert (_mode(deep / "plan.json"), (deep / "plan.json").read_text()) == (0o600, "{}\n")
    assert sorted(p.name for p in deep.iterdir()) == ["plan.json", "state.db"]


def test_existing_files_and_folders_are_tightened_and_kept(tmp_path: Path) -> None:
    """An existing file keeps its content and loses group and other bits."""
    path = tmp_path / "state.db"
    path.write_text("data")
    path.chmod(0o664)
    private_file(path)
    assert (_mode(path), path.read_text()) == (0o600, "data")
    folder = tmp_path / "f"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert _mode(private_dir(folder)) == 0o700


def test_a_loose_state_dir_is_tightened_all_through_once(tmp_path: Path) -> None:
    """A state dir readable by others is tightened with everything in it; then it is quiet."""
    state = tmp_path / "state"
    (state / "artifacts" / "run1").mkdir(parents=True)
    for folder in (state, state / "artifacts", state / "artifacts" / "run1"):
        folder.chmod(0o755)
    (state / "audit.jsonl").write_text("x\n")
    (state / "audit.jsonl").chmod(0o640)
    (state / "artifacts" / "run1" / "stdout").write_text("out\n")
    (state / "artifacts" / "run1" / "stdout").chmod(0o644)
    outside = tmp_path / "outside"
    outside.write_text("not ours\n")
    outside.chmod(0o644)
    (state / "link").symlink_to(outside)

    tightened = private_state_dir(state)

    assert tightened is not None
    assert (tightened.mode, tightened.entries, tightened.failed) == (0o755, 5, 0)
    assert str(state) in tightened.warning()
    assert "\n" not in tightened.warning()
    modes = {
        p.relative_to(state).as_posix(): _mode(p) for p in state.rglob("*") if not p.is_symlink()
    }
    assert modes == {
        "audit.jsonl": 0o600,
        "artifacts": 0o700,
        "artifacts/run1": 0o700,
        "artifacts/run1/stdout": 0o600,
    }
    assert _mode(state) == 0o700
    assert _mode(outside) == 0o644  # a symlink is never followed
    assert private_state_dir(state) is None


def test_a_private_dir_with_a_loose_entry_is_tightened(tmp_path: Path) -> None:
    """A 0700 state dir holding a database readable by others is not private either."""
    state = private_dir(tmp_path / "state")
    (state / "state.db").write_text("")
    (state / "state.db").chmod(0o644)
    tightened = private_state_dir(state)
    assert tightened is not None
    assert (tightened.mode, tightened.entries) == (0o700, 1)
    assert _mode(state / "state.db") == 0o600


def test_a_new_state_dir_is_made_private_silently(tmp_path: Path) -> None:
    """Creating the state dir is not worth a warning."""
    assert private_state_dir(tmp_path / "new" / "state") is None
    assert _mode(tmp_path / "new" / "state") == 0o700


def test_a_state_dir_that_cannot_be_made_private_is_a_state_error(tmp_path: Path) -> None:
    """A state dir path that is not a folder (or not ours) is refused with a clear error."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match=r"file/state: cannot make the state directory private"):
        private_state_dir(blocker / "state")
