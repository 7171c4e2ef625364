"""The package's errors, one policy: ``ValueError`` for a bad argument value, checked where it is given (the options at
construction, the tensor functions at their call); :class:`MultiMixError` for a set-up MultiMix cannot train right,
found on the model, the batch or the user's loss (at ``setup`` or the first batch, or by the health check)."""


class MultiMixError(RuntimeError):
    """Raised when MultiMix cannot train correctly on what it was given; the message says how to fix it."""
