"""User-facing errors: each carries one line that says what is wrong and how to fix it.

The CLI prints ``leansam: error: <message>`` for these and exits non-zero without a traceback.
"""


class LeansamError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class UnknownModelError(LeansamError, ValueError):
    pass


class CheckpointError(LeansamError, ValueError):
    pass


class InputError(LeansamError, ValueError):
    """A bad image, prompt or argument."""
