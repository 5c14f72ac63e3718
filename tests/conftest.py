"""Shared pytest configuration; fixtures live in tests/support/ and are registered here."""

from __future__ import annotations

pytest_plugins: list[str] = [
    "tests.support.lab",
    "tests.support.sshd",
    "tests.support.webhook",
    "tests.support.alertmanager",
    "tests.support.prometheus",
    "tests.support.postgres",
    "tests.support.stores",
    "tests.support.workers",
]
