"""unmask.bench: core types, data, model zoo, suite runner, results store, leaderboard, CLI.

Only the core types are imported here; the harness modules (``zoo``, ``cli``, ...) are
imported on use so that ``unmask.attacks`` can depend on the core without cycles.
"""

from importlib.metadata import version

from .core import (
    AttackResult,
    LargeEpsWarning,
    Norm,
    Normalize,
    ProbabilityOutputWarning,
    Threat,
    check_images,
    check_inputs,
    check_labels,
    check_logits,
    make_generator,
    margin,
    select_device,
)

__all__ = [
    "AttackResult",
    "Norm",
    "Normalize",
    "LargeEpsWarning",
    "ProbabilityOutputWarning",
    "Threat",
    "check_images",
    "check_inputs",
    "check_labels",
    "check_logits",
    "make_generator",
    "margin",
    "select_device",
    "__version__",
]


def _version() -> str:
    try:
        return version("unmask")
    except Exception:  # pragma: no cover - source tree without install
        return "0+unknown"


__version__ = _version()
