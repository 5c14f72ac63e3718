"""Secrets by value: every form a secret takes in text is scrubbed; short values are not."""

from __future__ import annotations

import base64
import json
import shlex
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from pydantic import BaseModel, ConfigDict

from engine.redaction import (
    REDACTED,
    Secrets,
    inventory_secrets,
    inventory_token_env,
    is_engine_secret_env,
    secrets_from_environment,
)

TOKEN = 'tok-3Xq/9+Zz"w\\é=0123'  # noqa: S105 - a test secret with characters encodings change
PLAIN = "plain-secret-0123456789"


@pytest.mark.parametrize(
    "form",
    [
        TOKEN,
        json.dumps(TOKEN)[1:-1],
        json.dumps(TOKEN, ensure_ascii=False)[1:-1],
        json.dumps(json.dumps(TOKEN)[1:-1])[1:-1],
        quote(TOKEN, safe=""),
        quote_plus(TOKEN),
        shlex.quote(TOKEN),
        repr(TOKEN)[1:-1],
    ],
)
def test_each_encoded_form_is_scrubbed(form: str) -> None:
    """The value, JSON-escaped (once or twice), URL-encoded, shell-quoted or repr'd, is replaced."""
    text = f"before {form} after"
    assert Secrets([TOKEN]).scrub(text) == f"before {REDACTED} after"


@pytest.mark.parametrize("prefix", ["", "u", "us", "user:", "Basic user:"])
def test_base64_of_a_string_holding_the_secret_loses_the_secret(prefix: str) -> None:
    """Whatever precedes it, the base64 characters that encode the secret are replaced."""
    encoded = base64.b64encode(f"{prefix}{PLAIN}!".encode()).decode()
    scrubbed = Secrets([PLAIN]).scrub(f"Authorization: Basic {encoded}")
    assert REDACTED in scrubbed
    core = base64.b64encode(PLAIN.encode()).decode()[1:-2]
    for offset in range(3):  # no 12-character run of any alignment's encoding survives
        shifted = base64.b64encode(b"\0" * offset + PLAIN.encode()).decode()
        assert not any(shifted[i : i + 12] in scrubbed for i in range(3, len(shifted) - 15))
    assert core not in scrubbed


def test_short_and_empty_values_are_not_scrubbed_by_value() -> None:
    """Values under eight characters (and booleans, None) would redact ordinary words."""
    secrets = Secrets(["", "admin", "1234567", True, None])
    assert not secrets
    assert secrets.scrub("admin 1234567 True") == "admin 1234567 True"


def test_numbers_are_scrubbed_as_text() -> None:
    """A numeric secret param is scrubbed in the form it is printed in."""
    assert Secrets([123456789]).scrub("pin=123456789") == f"pin={REDACTED}"


def test_scrub_data_reaches_every_string_and_key() -> None:
    """Nested strings, list items and mapping keys are scrubbed; other values are kept."""
    data = {"a": [PLAIN, {"b": f"x{PLAIN}y", PLAIN: 3}], "n": 5, "ok": True}
    assert Secrets([PLAIN]).scrub_data(data) == {
        "a": [REDACTED, {"b": f"x{REDACTED}y", REDACTED: 3}],
        "n": 5,
        "ok": True,
    }


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    vars: dict[str, str]


def test_scrub_model_returns_a_scrubbed_copy_or_the_same_model() -> None:
    """A model holding a secret comes back validated and scrubbed; one without is unchanged."""
    secrets = Secrets([PLAIN])
    clean = _Model(name="n", vars={"k": "v"})
    assert secrets.scrub_model(clean) is clean
    dirty = _Model(name="n", vars={"token": PLAIN})
    assert secrets.scrub_model(dirty) == _Model(name="n", vars={"token": REDACTED})


def test_scrub_file_keeps_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    """A file is rewritten with the secret replaced, its other bytes exactly as they were."""
    path = tmp_path / "stdout"
    path.write_bytes(b"\xff\xfe " + PLAIN.encode() + b" \x80\n")
    path.chmod(0o600)
    assert Secrets([PLAIN]).scrub_tree(tmp_path) == [path]
    assert path.read_bytes() == b"\xff\xfe " + REDACTED.encode() + b" \x80\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert Secrets([PLAIN]).scrub_tree(tmp_path) == []


def test_repr_never_shows_a_value() -> None:
    """The set's repr counts its values and shows none of them."""
    assert PLAIN not in repr(Secrets([PLAIN]))
    assert repr(Secrets([PLAIN])) == "Secrets(<1 values>)"


def test_with_values_adds_and_keeps_the_same_set_when_nothing_is_new() -> None:
    """Adding values known already (or too short) gives the same object."""
    secrets = Secrets([PLAIN])
    assert secrets.with_values([PLAIN, "short"]) is secrets
    both = secrets.with_values([TOKEN])
    assert both.values == {PLAIN, TOKEN}
    assert both == Secrets([TOKEN]) | Secrets([PLAIN])


def test_environment_secrets_are_the_known_names_and_those_listed() -> None:
    """The webhook, HMAC, approver and balena variables, plus REMEDIATE_SECRET_ENV's list."""
    environ = {
        "REMEDIATE_WEBHOOK_TOKEN": "webhook-token-0123456789",
        "REMEDIATE_WEBHOOK_HMAC_KEY": "hmac-key-0123456789",
        "REMEDIATE_APPROVER_ALICE": "alice-token-0123456789",
        "BALENA_API_KEY": "balena-key-0123456789",
        "MY_REGISTRY_PASS": "registry-pass-0123",
        "OTHER_TOKEN": "other-token-0123456789",
        "PWD": "/home/someone/project",  # looks like a password's name, is not one
        "REMEDIATE_SECRET_ENV": "MY_REGISTRY_PASS, CUSTOM_BALENA",
        "CUSTOM_BALENA": "custom-balena-0123456789",
    }
    found = secrets_from_environment(environ, names=["OTHER_TOKEN", None])
    assert found.values == {
        "webhook-token-0123456789",
        "hmac-key-0123456789",
        "alice-token-0123456789",
        "balena-key-0123456789",
        "registry-pass-0123",
        "other-token-0123456789",
        "custom-balena-0123456789",
    }
    assert secrets_from_environment({"PWD": "/home/someone"}).values == frozenset()


def test_engine_credentials_are_withheld_from_ansible_but_the_balena_token_is_not() -> None:
    """The webhook and approver variables are the engine's own; the tunnel needs balena's."""
    assert is_engine_secret_env("REMEDIATE_WEBHOOK_TOKEN")
    assert is_engine_secret_env("REMEDIATE_APPROVER_BOB")
    assert not is_engine_secret_env("BALENA_API_KEY")
    assert not is_engine_secret_env("PATH")


def test_inventory_token_env_is_read_from_a_plugin_config(tmp_path: Path) -> None:
    """A plugin inventory's token_env is found in a file or a folder; others name none."""
    folder = tmp_path / "inv"
    folder.mkdir()
    (folder / "static.ini").write_text("[fleet]\ndev1\n")
    (folder / "cloud.yml").write_text("plugin: balena_cloud\ntoken_env: MY_BALENA\nfleets: [a/b]\n")
    assert inventory_token_env(folder) == "MY_BALENA"
    assert inventory_token_env(folder / "cloud.yml") == "MY_BALENA"
    assert inventory_secrets(folder, {"MY_BALENA": "balena-token-0123"}) == ("balena-token-0123",)
    assert inventory_secrets(folder, {}) == ()
    (tmp_path / "hosts.yml").write_text("all: {hosts: {dev1: {token_env: x}}}\n")
    assert inventory_token_env(tmp_path / "hosts.yml") is None
    assert inventory_token_env(tmp_path / "missing.yml") is None
