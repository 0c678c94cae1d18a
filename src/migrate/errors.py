"""One error tree for migrate, so the CLI maps every failure to an exit code and a message.

    MigrateError                    anything migrate raises on purpose
    ├── ConfigError                 bad inventory/playbook/plan file (exit 2); carries every problem
    ├── PlanError                   a plan that cannot be run as written (hash, schema, drift) (exit 2)
    ├── PreflightError              the world disagrees with the plan before anything moved (exit 2)
    ├── ConnectorError              talking to vSphere, Proxmox VE, XCP-ng or a node failed
    │   ├── TransientError          worth retrying: resets, timeouts, 5xx, locks
    │   └── PermanentError          retrying cannot help: auth, not found, full storage
    │       ├── AuthError
    │       ├── TlsError
    │       └── UnreachableError     (DNS, connection refused, after retries)
    ├── StepError                   a migration step failed for one VM (the run goes on)
    └── LabError                    the local lab could not start or seed

Every error carries optional ``vm``, ``step`` and ``system`` attributes so logs and reports
can say where it happened without parsing the message.
"""

from __future__ import annotations

from dataclasses import dataclass


class MigrateError(Exception):
    """Base of all errors migrate raises on purpose; ``str()`` is a message a human can act on."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        vm: str | None = None,
        step: str | None = None,
        system: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.vm = vm
        self.step = step
        self.system = system
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation problem: where (file, line, $.path) and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.path}: {self.message}"


class ConfigError(MigrateError):
    """An input file is invalid; lists every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem | str, **kw: str | None) -> None:
        if isinstance(problems, str):
            problems = [Problem(file="", line=None, path="$", message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems), **kw)


class PlanError(MigrateError):
    """A plan file cannot be executed as written."""

    exit_code = 2


class PreflightError(MigrateError):
    """Checks before a run found the source or target not as the plan expects."""

    exit_code = 2


class ConnectorError(MigrateError):
    """Talking to an external system failed."""


class TransientError(ConnectorError):
    """A fault that may go away on its own; the executor retries these, and only these."""


class PermanentError(ConnectorError):
    """A fault retrying cannot fix."""


class AuthError(PermanentError):
    """Credentials were refused."""

    exit_code = 2


class TlsError(PermanentError):
    """The server's certificate could not be verified."""

    exit_code = 2


class UnreachableError(PermanentError):
    """The host could not be reached at all."""

    exit_code = 2


class NotFoundError(PermanentError):
    """Something named in an input does not exist on the system."""

    exit_code = 2


class StepError(MigrateError):
    """A migration step failed for one VM."""


class LabError(MigrateError):
    """The local lab could not be started, seeded or stopped."""
