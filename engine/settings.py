"""Settings an entry point builds once and passes down; nothing else reads the environment."""

from __future__ import annotations

import getpass
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.redaction import NO_SECRETS, Secrets, secrets_from_environment


class Settings(BaseModel):
    """Where runbooks, playbooks and run-time state live, who is acting, what is secret."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    runbooks_dir: Path
    playbooks_dir: Path
    state_dir: Path
    user: str
    secrets: Secrets = Field(default=NO_SECRETS, repr=False)
    """Values scrubbed from everything the engine keeps (see :mod:`engine.redaction`)."""
    state_url: str | None = None  # --state-url / REMEDIATE_STATE_URL, when given

    @property
    def audit_path(self) -> Path:
        """The append-only audit log."""
        return self.state_dir / "audit.jsonl"

    @property
    def db_path(self) -> Path:
        """The SQLite state store."""
        return self.state_dir / "state.db"

    def database_url(self, configured: str | None = None) -> str:
        """The state database's URL.

        ``--state-url`` / ``REMEDIATE_STATE_URL``, else ``configured`` (the server
        configuration's ``state:``), else the state directory's SQLite file.
        """
        return self.state_url or configured or f"sqlite:///{self.db_path}"

    @property
    def artifacts_dir(self) -> Path:
        """Per-run evidence and ansible-runner artifacts."""
        return self.state_dir / "artifacts"


def load_settings(
    cwd: Path,
    environ: Mapping[str, str],
    *,
    runbooks_dir: Path | None = None,
    playbooks_dir: Path | None = None,
    state_dir: Path | None = None,
    state_url: str | None = None,
) -> Settings:
    """Settings from explicit options, then ``REMEDIATE_*`` variables, then the project layout.

    The secrets are those of the environment (:func:`secrets_from_environment`).
    """

    def pick(option: Path | None, var: str, default: Path) -> Path:
        if option is not None:
            return option
        if environ.get(var):
            return Path(environ[var])
        return default

    user = environ.get("REMEDIATE_USER") or _login_name()
    return Settings(
        runbooks_dir=pick(runbooks_dir, "REMEDIATE_RUNBOOKS", cwd / "runbooks"),
        playbooks_dir=pick(playbooks_dir, "REMEDIATE_PLAYBOOKS", cwd / "playbooks"),
        state_dir=pick(state_dir, "REMEDIATE_STATE_DIR", cwd / ".remediate"),
        user=user,
        secrets=secrets_from_environment(environ),
        state_url=state_url or environ.get("REMEDIATE_STATE_URL") or None,
    )


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): still say something true
        return "unknown"
