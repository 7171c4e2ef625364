"""The package's error for training it refuses to do wrong (bad configuration values raise ``ValueError`` instead)."""


class MultiMixError(RuntimeError):
    """Raised when MultiMix cannot train correctly on what it was given; the message says how to fix it."""
