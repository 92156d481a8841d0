"""Library errors: one base class, one subclass per kind of refusal."""


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


class CaptureError(TensorLensError):
    """The capture forward pass could not record a needed frozen value (names the hook)."""


class ReplayError(TensorLensError):
    """A replay request is inconsistent (bad shape, layer range, head index, output point)."""


class VerificationError(TensorLensError):
    """``verify=True`` found that the replay does not reproduce the model or is not affine."""


class MissingExtraError(TensorLensError):
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
