"""Errors the CLI turns into one-line messages and exit codes.

Domain code raises these; only `runner.cli` formats them. The exit codes are a public
contract (README, "Exit codes"): scripts and CI jobs branch on them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PROVIDER = 3
EXIT_BUDGET = 4


class RunnerError(Exception):
    """A known failure with a message meant for the user and an exit code."""

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class BadInput(RunnerError):
    """The user's input (job spec, arguments, files) is wrong; nothing was changed."""

    exit_code = EXIT_BAD_INPUT


class SpecError(BadInput):
    """A job spec failed validation; `details` holds one line per problem."""


class NotFound(BadInput):
    """A run, image or file the user named does not exist."""


class ProviderFailure(RunnerError):
    """The provider, the container engine or the network failed after retries."""

    exit_code = EXIT_PROVIDER


class StateBusy(RunnerError):
    """The state database stayed locked by another process past the wait; nothing was written."""

    exit_code = EXIT_PROVIDER


class RunFailed(RunnerError):
    """A run's own step failed (a setup or train command exited non-zero)."""

    exit_code = EXIT_RUN_FAILED


class BudgetExceeded(RunnerError):
    """A budget refused or stopped the run."""

    exit_code = EXIT_BUDGET


# -- what a provider's API can answer; the pipeline acts on the type ----------------------


class NoCapacity(ProviderFailure):
    """The cloud has no free GPU (or instance capacity) for this boot right now; try later."""


class AuthFailed(ProviderFailure):
    """The provider refused the credentials (a wrong or expired token)."""


class InsufficientBalance(ProviderFailure):
    """The account's balance cannot pay for what was asked."""


class InstanceNotFound(ProviderFailure):
    """The instance named does not exist (any more)."""


class Transient(ProviderFailure):
    """A failure worth retrying as is: a timeout, HTTP 5xx, a dropped connection."""
