"""The server configuration file: defaults, env secrets, relative paths, located errors."""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.server.config import HMAC_KEY_ENV, TOKEN_ENV, Tls, load_server_config
from engine.server.tls import check_tls
from tests.support.tls import certificate_authority

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "server.yml"
    path.write_text(text)
    path.chmod(mode)
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


def test_tls_paths_are_relative_to_the_file_and_client_certificates_authenticate(
    tmp_path: Path,
) -> None:
    """listen.tls paths are anchored at the file; a client CA is authentication enough."""
    path = _write(
        tmp_path,
        "inventory: hosts.ini\n"
        "listen: {host: 0.0.0.0, tls: {cert: pki/server.pem, key: pki/server-key.pem, "
        "client_ca: pki/ca.pem}}\n",
    )
    config = load_server_config(path, {})
    assert config.listen.tls is not None
    assert config.listen.tls.cert == tmp_path / "pki" / "server.pem"
    assert config.listen.tls.key == tmp_path / "pki" / "server-key.pem"
    assert config.listen.tls.client_ca == tmp_path / "pki" / "ca.pem"
    assert config.listen.client_certificates
    assert not config.listen.loopback
    assert not config.auth.configured


def test_unauthenticated_is_for_loopback_only(tmp_path: Path) -> None:
    """allow_unauthenticated on an address others can reach is refused, naming the host."""
    text = "inventory: h\nauth: {allow_unauthenticated: true}\nlisten: {host: %s}\n"
    assert load_server_config(_write(tmp_path, text % "::1"), {}).listen.loopback
    assert load_server_config(_write(tmp_path, text % "localhost"), {}).listen.loopback
    with pytest.raises(ConfigError, match=r"loopback listen.host only: on 0\.0\.0\.0 anyone"):
        load_server_config(_write(tmp_path, text % "0.0.0.0"), {})  # noqa: S104 - the point


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_a_file_holding_secrets_must_be_private(tmp_path: Path, mode: int) -> None:
    """A config file with a token or approver tokens, readable by group or others, is refused."""
    text = (
        "inventory: h\nauth: {hmac_key: file-key-0123456789}\n"
        "approvals: {approvers: {alice: alice-token-0123456789}}\n"
    )
    path = _write(tmp_path, text, mode=mode)
    with pytest.raises(ConfigError) as caught:
        load_server_config(path, {})
    message = str(caught.value)
    assert str(path) in message
    assert "auth.hmac_key, approvals.approvers.alice" in message
    assert f"mode {mode:04o}" in message
    assert "alice-token" not in message


def test_a_file_without_secrets_may_be_readable_and_secrets_are_listed(tmp_path: Path) -> None:
    """Secrets from the environment leave the file free to be shared; all are known by value."""
    path = _write(
        tmp_path,
        "inventory: h\napprovals: {approvers: {bob: placeholder-0123456789}}\n",
        mode=0o600,
    )
    config = load_server_config(
        path, {TOKEN_ENV: "env-token-0123456789", "REMEDIATE_APPROVER_BOB": "bob-token-0123456789"}
    )
    assert set(config.secret_values) == {"env-token-0123456789", "bob-token-0123456789"}
    shared = _write(tmp_path, "inventory: h\n", mode=0o644)
    assert load_server_config(shared, {TOKEN_ENV: "env-token-0123456789"}).auth.configured


def _tls(tmp_path: Path, **override: Path) -> Tls:
    authority = certificate_authority(tmp_path / "pki", "test")
    server = authority.issue("server", server=True)
    files = {"cert": server.cert, "key": server.key, "client_ca": authority.cert, **override}
    return Tls.model_validate(files)


def test_usable_tls_files_give_uvicorns_options(tmp_path: Path) -> None:
    """A matching certificate and key with a client CA ask uvicorn for client certificates."""
    tls = _tls(tmp_path)
    options = check_tls(tls)
    assert options.ssl_certfile == str(tls.cert)
    assert options.ssl_ca_certs == str(tls.client_ca)
    assert options.ssl_cert_reqs == ssl.CERT_REQUIRED
    assert check_tls(tls.model_copy(update={"client_ca": None})).ssl_cert_reqs == ssl.CERT_NONE


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    """The server does not start with a private key group or others can read."""
    tls = _tls(tmp_path)
    tls.key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"server-key\.pem: listen\.tls\.key: .* \(mode 0644\)"):
        check_tls(tls)


def test_unusable_tls_files_are_named(tmp_path: Path) -> None:
    """A missing file, a key of another certificate or a CA file with no certificate are named."""
    other = certificate_authority(tmp_path / "other", "other").issue("other", server=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        (_tls(tmp_path, cert=tmp_path / "nope.pem"), "nope.pem: listen.tls: the TLS certificate"),
        (_tls(tmp_path, key=other.key), "cannot use this certificate with the key"),
        (_tls(tmp_path, client_ca=junk), "junk.pem: listen.tls.client_ca: not a PEM CA"),
    ]
    for tls, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            check_tls(tls)
