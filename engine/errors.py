"""The one exception tree of the engine.

Outcomes (a denied guard, a failed playbook, an unfixed device) are values in
the report, never exceptions.  Exceptions are for input the engine cannot work
with and for faults of the machinery itself::

    EngineError                    root; the CLI maps it to an exit code
    ├── InputError                 bad input from a person (exit 2)
    │   ├── RunbookError           a runbook failed to load; lists file:line: field: message
    │   ├── InventoryError         an inventory could not be read, or selected no host
    │   ├── ParamError             a -e key=value override is unknown or of the wrong type
    │   ├── ConfigError            a server/lab configuration file is invalid
    │   └── PlanFileError          a saved plan is edited, expired or stale
    └── FaultError                 the engine could not do its job (exit 3)
        ├── ExecutorError          ansible-runner (or the lab) failed as a tool, not a device
        ├── InventorySourceError   an inventory's source (the balena API) is down or talks nonsense
        ├── StateError             the state store could not be read or written
        └── AuditError             the audit log could not be written or is corrupt
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""

    exit_code = 3


class InputError(EngineError):
    """Input a person gave cannot be used; nothing was changed."""

    exit_code = 2


class FaultError(EngineError):
    """The engine or a tool it drives failed; the report says how far it got."""

    exit_code = 3


@dataclass(frozen=True)
class Problem:
    """One located problem in an input file."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class RunbookError(InputError):
    """One or more runbooks are invalid; ``problems`` lists each with its location."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("RunbookError needs at least one problem")
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class InventoryError(InputError):
    """An inventory could not be parsed, or the host pattern selected nothing."""


class ParamError(InputError):
    """A parameter override names an undeclared parameter or has the wrong type."""


class ConfigError(InputError):
    """A configuration file is invalid."""


class PlanFileError(InputError):
    """A saved plan cannot be applied: edited, expired, or made from another runbook."""


class ExecutorError(FaultError):
    """The executor (ansible-runner) failed as a tool."""


class InventorySourceError(FaultError):
    """An inventory's source (an API such as balena's) is unavailable or answered nonsense."""


class StateError(FaultError):
    """The state store failed."""


class AuditError(FaultError):
    """The audit log could not be written or read."""
