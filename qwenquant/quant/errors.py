"""The one error the math raises for bad data rather than a bug: NaN or Inf in what it was given."""


class NonFiniteError(ValueError):
    """A weight, Hessian or activation holds NaN or Inf (a broken checkpoint or calibration data, not a bug)."""
