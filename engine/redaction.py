"""Secrets by value: the values the engine knows to be secret, and scrubbing them out of text.

Redaction by key (``password``, ``*_token``…, see :mod:`engine.audit`) misses a secret that
shows up as data: a token a command echoed, an ``Authorization`` header in a curl error, a
secret param rendered into a step's output.  :class:`Secrets` holds the values themselves;
entry points build one (:func:`secrets_from_environment`, plus the server's own tokens), pass
it down, and the adapters that keep things scrub with it: the executor (ansible-runner's
events and artifacts), saved plans, the audit log's processor chain.  A run adds the values
of its runbook's secret params (:meth:`Secrets.with_values`).

A value is replaced wherever it occurs, and so are the forms a shell, curl or a JSON writer
turns it into: JSON-escaped (ASCII or not, and escaped twice, as in JSON inside JSON),
URL-encoded, shell-quoted, Python's ``repr``, and base64 (``Authorization: Basic`` carries
``base64(user:token)``; the part of it that encodes the token alone is replaced, whatever
precedes it).  Values shorter than :data:`MIN_SCRUB_LENGTH` are not scrubbed by value: "admin"
or "1234" would turn every log into ``[REDACTED]`` and hide nothing.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

from pydantic import BaseModel

#: What a secret is replaced with.
REDACTED = "[REDACTED]"
#: Shorter values are not scrubbed by value (they would match ordinary text).
MIN_SCRUB_LENGTH = 8

#: Environment variables that hold secrets the engine knows by name: the server's webhook
#: token and HMAC key (its own credentials), and the balena API token an inventory's
#: ``token_env`` names by default.
ENGINE_SECRET_ENV = ("REMEDIATE_WEBHOOK_TOKEN", "REMEDIATE_WEBHOOK_HMAC_KEY")
SECRET_ENV = (*ENGINE_SECRET_ENV, "BALENA_API_KEY")
#: Prefix of the server's approver tokens in the environment.
SECRET_ENV_PREFIXES = ("REMEDIATE_APPROVER_",)
#: Names more variables (comma separated) whose values are secrets.
SECRET_ENV_LIST = "REMEDIATE_SECRET_ENV"  # noqa: S105 - a variable name, not a secret

_M = TypeVar("_M", bound=BaseModel)


class Secrets:
    """An immutable set of secret values, and :meth:`scrub` to replace them in text and data.

    Build it once (an entry point) and pass it down; :meth:`with_values` returns a new set.
    Its ``repr`` shows how many values it holds, never one of them.
    """

    __slots__ = ("_forms", "_pattern", "_values")

    def __init__(self, values: Iterable[object] = ()) -> None:
        kept = set()
        for value in values:
            text = _text(value)
            if text is not None and len(text) >= MIN_SCRUB_LENGTH:
                kept.add(text)
        self._values = frozenset(kept)
        forms = sorted({f for v in self._values for f in _forms(v)}, key=len, reverse=True)
        self._forms = tuple(forms)
        self._pattern = re.compile("|".join(map(re.escape, forms))) if forms else None

    @property
    def values(self) -> frozenset[str]:
        """The secret values (long enough to be scrubbed)."""
        return self._values

    def with_values(self, values: Iterable[object]) -> Secrets:
        """These secrets and ``values`` (strings, numbers; ``None`` and booleans are ignored)."""
        more = frozenset(
            t for t in (_text(v) for v in values) if t is not None and len(t) >= MIN_SCRUB_LENGTH
        )
        if more <= self._values:
            return self
        return Secrets(self._values | more)

    def __or__(self, other: Secrets) -> Secrets:
        return self.with_values(other.values)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secrets) and other.values == self._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Secrets(<{len(self._values)} values>)"

    def found_in(self, text: str) -> bool:
        """Whether ``text`` holds one of the secrets (in any of the forms scrubbed)."""
        # A substring search per form: far faster than the alternation of them all.
        return any(form in text for form in self._forms)

    def scrub(self, text: str) -> str:
        """``text`` with every secret (and each encoded form of it) replaced by ``[REDACTED]``."""
        if self._pattern is None or len(text) < MIN_SCRUB_LENGTH or not self.found_in(text):
            return text
        return self._pattern.sub(REDACTED, text)

    def scrub_data(self, value: Any) -> Any:
        """JSON-like ``value`` with :meth:`scrub` applied to every string in it (keys included).

        Returns ``value`` itself when nothing in it is secret.
        """
        if self._pattern is None:
            return value
        return _scrub_data(value, self.scrub)

    def scrub_model(self, model: _M) -> _M:
        """``model`` with every secret in its JSON form replaced (``model`` if none is there)."""
        if self._pattern is None or not self.found_in(model.model_dump_json()):
            return model
        return type(model).model_validate(self.scrub_data(model.model_dump(mode="json")))

    def scrub_file(self, path: Path) -> bool:
        """Rewrite ``path`` (any bytes) with the secrets replaced; whether it held any.

        The file is rewritten in place, keeping its inode and mode.
        """
        if self._pattern is None:
            return False
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="surrogateescape")
        scrubbed = self.scrub(text)
        if scrubbed == text:
            return False
        with path.open("r+b") as handle:
            handle.write(scrubbed.encode("utf-8", errors="surrogateescape"))
            handle.truncate()
        return True

    def scrub_tree(self, root: Path) -> list[Path]:
        """Scrub every regular file under ``root`` (symlinks are not followed); those changed."""
        if self._pattern is None:
            return []
        return [path for path in _files(root) if self.scrub_file(path)]


#: No secrets: the default wherever secrets are passed down.
NO_SECRETS = Secrets()


def _text(value: object) -> str | None:
    """A value as the text it shows up as; ``None`` for values that are never secret."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return None


def _forms(value: str) -> set[str]:
    """``value`` and the encoded forms of it that are scrubbed as well."""
    base = {
        value,
        quote(value, safe=""),
        quote_plus(value, safe=""),
        shlex.quote(value),
        repr(value)[1:-1],
        *_base64_cores(value),
    }
    forms = set(base)
    for form in base:
        for ascii_only in (True, False):
            once = json.dumps(form, ensure_ascii=ascii_only)[1:-1]
            forms.add(once)
            forms.add(json.dumps(once, ensure_ascii=ascii_only)[1:-1])
    return {form for form in forms if len(form) >= MIN_SCRUB_LENGTH}


def _base64_cores(value: str) -> Iterator[str]:
    """The base64 text that encodes ``value`` wherever it sits in a longer encoded string.

    Base64 maps 3 bytes to 4 characters, so the encoding of ``value`` depends on its offset
    modulo 3 within the encoded text; for each offset, the characters that encode bits of
    ``value`` only are the same in every string that contains it (standard and URL-safe
    alphabets).
    """
    data = value.encode("utf-8")
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode("ascii")
        first = -(-8 * offset // 6)  # the first character with no bits of the prefix
        last = 8 * (offset + len(data)) // 6  # characters past this take bits of what follows
        core = encoded[first:last]
        yield core
        yield core.replace("+", "-").replace("/", "_")


def _scrub_data(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {
            scrub(k) if isinstance(k, str) else k: _scrub_data(v, scrub) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_data(v, scrub) for v in value]
    return value


def _files(root: Path) -> Iterator[Path]:
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path


def secrets_from_environment(
    environ: Mapping[str, str], *, names: Iterable[str | None] = ()
) -> Secrets:
    """The secrets in an environment: the variables the engine knows hold one, and ``names``.

    Known: :data:`SECRET_ENV`, ``REMEDIATE_APPROVER_*``, and the variables listed (comma
    separated) in ``REMEDIATE_SECRET_ENV``, for an operator's own (a registry password a
    playbook uses).  Names are not guessed: ``PWD`` looks like a password's name.
    """
    wanted = {*SECRET_ENV, *(n for n in names if n)}
    wanted |= {n.strip() for n in environ.get(SECRET_ENV_LIST, "").split(",") if n.strip()}
    return Secrets(
        value
        for name, value in environ.items()
        if name in wanted or name.startswith(SECRET_ENV_PREFIXES)
    )


def inventory_secrets(inventory: Path, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The API token ``inventory``'s plugin reads from the environment, if it is set there.

    The balena inventory reads it from the variable its ``token_env`` names
    (``BALENA_API_KEY``, known anyway, by default).
    """
    name = inventory_token_env(inventory)
    token = environ.get(name, "") if name else ""
    return (token,) if token else ()


def inventory_token_env(inventory: Path) -> str | None:
    """The variable an inventory plugin's configuration reads its API token from, if any.

    A YAML inventory file (or one directly in an inventory folder) naming a ``plugin`` and
    its ``token_env`` (the balena inventory's, ``BALENA_API_KEY`` by default).
    """
    import yaml  # noqa: PLC0415 - only commands that name an inventory pay for it

    try:
        files = sorted(inventory.iterdir()) if inventory.is_dir() else [inventory]
    except OSError:
        return None
    for path in files:
        if path.suffix not in {".yml", ".yaml"} or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if "token_env" not in text:
                continue
            data = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # not ours to judge: Ansible reports an unreadable inventory
        name = data.get("token_env") if isinstance(data, dict) and "plugin" in data else None
        if isinstance(name, str):
            return name
    return None


# --------------------------------------------------------------------------- secrets by name

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SECRET_NAME = re.compile(
    r"(?:^|[_\-.])(?:"
    r"pass|passwd|password|passphrase|pwd|secrets?|tokens?|credentials?|creds?|"
    r"authorization|bearer|cookies?|session[_\-.]?ids?|"
    r"(?:api|private|secret|access|ssh|signing|encryption)[_\-.]?keys?"
    r")(?:$|[_\-.])"
)


#: Key names up to this long have their answer remembered (alert labels repeat a lot; a
#: hostile flood of long, unique names must not fill memory).
_REMEMBERED_NAME_LENGTH = 64


def is_secret_name(key: str) -> bool:
    """Return whether a field named ``key`` conventionally holds a secret."""
    if len(key) > _REMEMBERED_NAME_LENGTH:
        return _looks_secret(key)
    return _looks_secret_remembered(key)


def _looks_secret(key: str) -> bool:
    return _SECRET_NAME.search(_CAMEL.sub("_", key).lower()) is not None


_looks_secret_remembered = functools.lru_cache(maxsize=4096)(_looks_secret)


def is_engine_secret_env(name: str) -> bool:
    """Whether variable ``name`` holds one of the engine's own credentials (webhook, approvers).

    ansible-playbook and the commands it runs never need them (unlike ``BALENA_API_KEY``,
    which the SSH tunnel to a device needs).
    """
    return name in ENGINE_SECRET_ENV or name.startswith(SECRET_ENV_PREFIXES)
