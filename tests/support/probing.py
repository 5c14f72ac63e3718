"""Fake device answers for probes: encode check results the way the probe script prints them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_NONCE = re.compile(r"@@remediate-[0-9a-f]+")
_CHECK = re.compile(r"^__rc (\w+) ", re.M)

Answer = str | tuple[int, str]


def encode_records(script: str, answers: Mapping[str, Answer]) -> str:
    """The stdout a device would print for ``script`` if each check answered as given.

    A check missing from ``answers`` fails with exit code 1 and no output.
    """
    match = _NONCE.search(script)
    assert match is not None, "not a probe script"
    nonce = match.group(0)
    out = []
    for check_id in _CHECK.findall(script):
        answer = answers.get(check_id, (1, ""))
        rc, stdout = (0, answer) if isinstance(answer, str) else answer
        lines = stdout.splitlines()
        out += [f"{nonce} C {check_id} {rc} 0 0", *lines, f"{nonce} E 0", f"{nonce} Z"]
    return "\n".join(out) + "\n"


def device(answers: Mapping[str, Answer]) -> Callable[[str], str]:
    """A FakeExecutor script answer: the device answers every probe from ``answers``.

    The mapping is read at each probe, so a test can change it to simulate a fix.
    """
    return lambda script: encode_records(script, answers)
