"""Schema migrations: numbered steps, each applied once, in one transaction, then frozen.

Each backend keeps its own ordered list (its SQL differs) and records what it applied in a
``schema_version`` table; opening a database applies what is missing, and refuses a
database migrated by a newer engine (its version is higher than the list is long).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One step of the schema: statements run in one transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


def check_migrations(migrations: tuple[Migration, ...]) -> None:
    """Refuse a list whose versions are not 1..N in order (a programming error)."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migration versions must be 1..{len(migrations)} in order: {versions}")
