"""unmask.defenses: training recipes, inference-time defenses, gradient-masking diagnosis."""

from .adversarial import (
    AdversarialLoss,
    FastAdversarialLoss,
    PGDAdversarialLoss,
    TrainingMethod,
    adversarial_training,
    robustness_metrics,
)
from .backdoor import DetectionResult, activation_clustering, spectral_signatures
from .backdoor_report import BackdoorReport, evaluate_backdoor
from .certified import training as _certified_training  # noqa: F401 - registers recipe 'ibp'
from .fine_pruning import FinePruningResult, fine_pruning
from .gradreg import GradientPenaltyLoss, PenaltyNorm, gradient_regularization
from .inference import (
    JPEG,
    Defended,
    GaussianNoiseInput,
    InputQuantization,
    JPEGCompression,
    LowTemperature,
    ProbabilityOutput,
    Quantize,
    RandomNoise,
    ScaleLogits,
    Softmax,
)
from .masking import VERDICT_MEANING, CheckResult, MaskingKind, MaskingReport, Verdict, diagnose
from .strip import StripResult, strip, strip_entropy
from .trades import TradesLoss

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
    "VERDICT_MEANING",
    "Verdict",
    "diagnose",
]
__all__ += [  # training recipes
    "AdversarialLoss",
    "FastAdversarialLoss",
    "GradientPenaltyLoss",
    "TrainingMethod",
    "PGDAdversarialLoss",
    "PenaltyNorm",
    "TradesLoss",
    "adversarial_training",
    "gradient_regularization",
    "robustness_metrics",
]
__all__ += [  # inference-time defenses (masking controls)
    "Defended",
    "GaussianNoiseInput",
    "InputQuantization",
    "JPEG",
    "JPEGCompression",
    "LowTemperature",
    "ProbabilityOutput",
    "Quantize",
    "RandomNoise",
    "ScaleLogits",
    "Softmax",
]
