"""Errors the CLI turns into one-line messages and documented exit codes."""

from __future__ import annotations

# Exit codes (documented in README.md): 0 ok, 1 unexpected internal error.
EXIT_BAD_INPUT = 2
EXIT_QUALITY_GATE = 3
EXIT_VERIFICATION = 4
EXIT_RESOURCES = 5


class QwenquantError(Exception):
    """A user-facing failure: `str(err)` is the one-line message, `exit_code` the process status."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(QwenquantError):
    """The user's model, data, flags or output path cannot be used as given."""

    exit_code = EXIT_BAD_INPUT


class VerificationError(QwenquantError):
    """The written checkpoint does not reproduce the quantized model when reloaded."""

    exit_code = EXIT_VERIFICATION


class QualityGateError(QwenquantError):
    """Measured quality missed a gate the user set (the report was still written)."""

    exit_code = EXIT_QUALITY_GATE


class ResourceError(QwenquantError):
    """Disk or memory ran out."""

    exit_code = EXIT_RESOURCES


class ResumableError(QwenquantError):
    """A failure that ends a run part-way without making its finished layers wrong (a rank of a distributed run
    died or stalled): the output folder code keeps them for --resume, as on Ctrl-C."""

    exit_code = 1


class InterruptedRun(QwenquantError):
    """Ctrl-C or SIGTERM stopped a run whose finished layers were kept for --resume."""

    exit_code = 130
