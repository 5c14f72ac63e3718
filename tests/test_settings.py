"""Settings: where the engine finds runbooks, playbooks and its state."""

from __future__ import annotations

from pathlib import Path

from engine.settings import load_settings


def test_relative_paths_are_taken_from_the_working_directory(tmp_path: Path) -> None:
    """A relative REMEDIATE_STATE_DIR or option becomes absolute under the working directory."""
    environ = {"REMEDIATE_STATE_DIR": "state", "REMEDIATE_RUNBOOKS": "../rb"}
    settings = load_settings(tmp_path, environ, playbooks_dir=Path("pb/./x"))
    assert settings.state_dir == tmp_path / "state"
    assert settings.runbooks_dir == tmp_path.parent / "rb"
    assert settings.playbooks_dir == tmp_path / "pb" / "x"
    absolute = load_settings(tmp_path, {"REMEDIATE_STATE_DIR": "/srv/remediate"})
    assert absolute.state_dir == Path("/srv/remediate")
    assert absolute.runbooks_dir == tmp_path / "runbooks"
