"""unmask.defenses: training recipes, inference-time defenses, gradient-masking diagnosis."""

from .backdoor import DetectionResult, activation_clustering, spectral_signatures
from .backdoor_report import BackdoorReport, evaluate_backdoor
from .fine_pruning import FinePruningResult, fine_pruning
from .masking import CheckResult, MaskingKind, MaskingReport, Verdict, diagnose
from .strip import StripResult, strip, strip_entropy

__all__: list[str] = []
__all__ += [  # backdoor detection and mitigation
    "BackdoorReport",
    "DetectionResult",
    "FinePruningResult",
    "StripResult",
    "activation_clustering",
    "evaluate_backdoor",
    "fine_pruning",
    "spectral_signatures",
    "strip",
    "strip_entropy",
]
__all__ += [  # gradient-masking diagnosis
    "CheckResult",
    "MaskingKind",
    "MaskingReport",
    "Verdict",
    "diagnose",
]
