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


class MissingDependencyError(LeansamError, ImportError):
    """An optional dependency is needed for this feature."""


class TrainingError(LeansamError, RuntimeError):
    """A training run ended in a state its recipe rejects (a decoder warm start that draws no
    boxes, ``min_box_iou``); the message says what was measured and what to change."""


class RandomWeightsWarning(UserWarning):
    """A model was built without weights: its masks are meaningless (the CLI prints it as one
    ``warning:`` line)."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a one-line hint naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"this needs the `{module.split('.')[0]}` package: pip install 'leansam[{extra}]'"
        ) from None
