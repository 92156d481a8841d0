"""Library errors: one base class, one subclass per kind of refusal.

Every error tl_tensorlens raises on purpose is a :class:`TensorLensError`; the subclass says what
kind of problem it is, the message names the culprit (argument and value, hook, shape, file and
line, memory estimate, package to install) and what is allowed instead.

Example:
    >>> try:
    ...     raise ArgumentError("positions", 9, "0..3 (or -4..-1 from the end)")
    ... except TensorLensError as e:
    ...     print(e)
    positions=9 is not allowed: expected 0..3 (or -4..-1 from the end)
"""

from typing import Any


class TensorLensError(Exception):
    """Base class of every error tl_tensorlens raises on purpose."""


class UnsupportedModelError(TensorLensError):
    """The model uses a setting whose replay cannot be made exact.

    The message names every offending config field or component, so a user can see at
    once what to change (or that the architecture is out of reach).
    """

    def __init__(self, fields: dict[str, str]):
        self.fields = dict(fields)
        lines = "; ".join(f"{k}: {v}" for k, v in self.fields.items())
        super().__init__(f"cannot build an exact linear replay for this model ({lines})")


class ArgumentError(TensorLensError, ValueError):
    """An argument has a value that is not allowed (wrong type, out of range, unknown name).

    Attributes:
        argument: the argument's name as the caller wrote it.
        value: the value given.
        allowed: what is allowed, in words.
    """

    def __init__(self, argument: str, value: Any, allowed: str, hint: str = ""):
        self.argument, self.value, self.allowed = argument, value, allowed
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        msg = f"{argument}={shown} is not allowed: expected {allowed}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class CaptureError(TensorLensError):
    """The capture forward pass could not record a needed frozen value (names the hook)."""


class ReplayError(TensorLensError):
    """A replay is inconsistent at run time (a hook saw an unexpected shape, an output hook never
    fired); bad arguments to a replay raise :class:`ArgumentError`."""


class StateMismatchError(TensorLensError):
    """A capture is used with a model it does not belong to (other weights, config, dtype, layer
    count), after the model's weights changed, inside another capture's frozen replay, or from a
    second thread while the model is busy. The message names what differs."""


class VerificationError(TensorLensError):
    """``verify=True`` found that the replay does not reproduce the model or is not affine, or
    that a probe or output was not finite."""


class MissingDependencyError(TensorLensError, ImportError):
    """An optional package is not installed; the message names the extra and the install command."""


class MissingExtraError(MissingDependencyError):
    """An optional dependency (a project extra, or a package that must be installed by hand) is
    absent; the message names the extra, the missing packages and the exact install commands."""

    def __init__(self, what: str, extra: str, missing: list[str], commands: list[str]):
        self.extra = extra
        self.missing = list(missing)
        self.commands = list(commands)
        super().__init__(
            f"{what} needs the packages {', '.join(self.missing)} (the `{extra}` extra), which are not "
            f"installed; install them with: {' && '.join(self.commands)}"
        )


class MemoryBudgetError(TensorLensError):
    """A request would allocate more than the memory budget; the message gives the estimate
    and a cheaper alternative."""


class CheckpointError(TensorLensError):
    """A checkpoint folder is missing, malformed, or lacks weights the model computes with."""


class DataError(TensorLensError):
    """A data file or folder is missing, unreadable, or not in the expected format."""


class RelationDataError(DataError):
    """A relation file or folder is missing, unreadable, or not in the LRE format."""


class PromptAlignmentError(TensorLensError):
    """A relation sample cannot be aligned to the prompt length the study needs."""


class ResultsStoreError(TensorLensError):
    """A results file holds a corrupt line (file and line named) or conflicting rows for one key."""


class CliError(TensorLensError):
    """A user mistake on the command line (printed as one line, exit status 2)."""


__all__ = [
    "ArgumentError",
    "CaptureError",
    "CheckpointError",
    "CliError",
    "DataError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "MissingExtraError",
    "PromptAlignmentError",
    "RelationDataError",
    "ReplayError",
    "ResultsStoreError",
    "StateMismatchError",
    "TensorLensError",
    "UnsupportedModelError",
    "VerificationError",
]
