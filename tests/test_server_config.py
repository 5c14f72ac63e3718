"""The server configuration file: defaults, env secrets, relative paths, located errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.server.config import HMAC_KEY_ENV, TOKEN_ENV, load_server_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.yml"
    path.write_text(text)
    return path


def test_the_example_config_loads_with_a_token_from_the_environment() -> None:
    """The shipped example is valid once a secret comes from the environment."""
    example = ROOT / "config" / "remediate-server.example.yml"
    config = load_server_config(example, {TOKEN_ENV: "t" * 20})
    assert config.listen.host == "127.0.0.1"
    assert config.inventory == example.parent / "../inventories/localhost.yml"
    assert config.breaker.window == timedelta(minutes=10)
    assert config.auth.token is not None
    assert config.auth.token.get_secret_value() == "t" * 20


def test_environment_secrets_override_the_file(tmp_path: Path) -> None:
    """REMEDIATE_WEBHOOK_TOKEN and _HMAC_KEY replace the file's values."""
    path = _write(tmp_path, "inventory: hosts.ini\nauth: {token: file-token-0123456789}\n")
    config = load_server_config(path, {TOKEN_ENV: "env-token-0123456789", HMAC_KEY_ENV: "k" * 16})
    assert config.auth.token is not None
    assert config.auth.token.get_secret_value() == "env-token-0123456789"
    assert config.auth.hmac_key is not None
    assert config.inventory == tmp_path / "hosts.ini"


def test_secrets_are_not_shown(tmp_path: Path) -> None:
    """The token never appears in the config's repr."""
    path = _write(tmp_path, "inventory: hosts.ini\nauth: {token: do-not-print-0123456789}\n")
    assert "do-not-print" not in repr(load_server_config(path, {}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("inventory: h\nauth: {token: short}\n", ":2: auth: token must be at least 16 characters"),
        (
            "inventory: h\nworkrs: 2\nauth: {allow_unauthenticated: true}\n",
            ":2: workrs: unknown field",
        ),
        (
            "inventory: h\nlisten: {port: 70000}\nauth: {allow_unauthenticated: true}\n",
            ":2: listen.port:",
        ),
        (
            "inventory: h\nbreaker: {window: soon}\nauth: {allow_unauthenticated: true}\n",
            ":2: breaker.window:",
        ),
        ("inventory: h\n", "no authentication configured"),
        ("auth: {allow_unauthenticated: true}\n", "inventory: Field required"),
        ("- a list\n", "must be a mapping"),
        ("inventory: [\n", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_file_line_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    """Every problem is a ConfigError naming the file (and line and field where there is one)."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_server_config(path, {})
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_server_config(tmp_path / "nope.yml", {})
