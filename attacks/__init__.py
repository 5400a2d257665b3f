"""unmask.attacks: evasion attacks (one file each) and backdoor poisoning."""

from .adaptive import AdaptiveSquare, APGDTMalt, adaptive_attacks
from .apgd import APGD, APGDT
from .backdoor import (
    Backdoor,
    BackdoorMode,
    PoisonedSet,
    attack_success_rate,
    backdoor_labels,
    poison,
    triggered_test_set,
)
from .backdoor_triggers import TRIGGERS, BadNets, Blend, Trigger, WaNet, make_trigger
from .base import ATTACKS, Attack, GradientOracle, Tracker, register_attack
from .bpda import BPDA
from .branch_pgd import BranchAttackResult, BranchPGD
from .ensemble import PRESETS, Ensemble, EnsembleResult, attack_in_precision
from .eot import EOT, success_rate
from .fgsm import FGSM
from .losses import Loss
from .pgd import PGD
from .square import Square
from .transfer import Transfer
from .transforms import (
    Brightness,
    Compose,
    GaussianNoise,
    RandomAffine,
    Rotation,
    Scale,
    Translation,
)

__all__: list[str] = [
    "ATTACKS",
    "APGD",
    "APGDT",
    "APGDTMalt",
    "AdaptiveSquare",
    "adaptive_attacks",
    "Attack",
    "BPDA",
    "BranchAttackResult",
    "BranchPGD",
    "Brightness",
    "Compose",
    "EOT",
    "Ensemble",
    "EnsembleResult",
    "attack_in_precision",
    "FGSM",
    "GaussianNoise",
    "GradientOracle",
    "Loss",
    "PGD",
    "PRESETS",
    "RandomAffine",
    "Rotation",
    "Scale",
    "Square",
    "Tracker",
    "Transfer",
    "Translation",
    "register_attack",
    "success_rate",
]
__all__ += [  # backdoor poisoning
    "Backdoor",
    "BackdoorMode",
    "BadNets",
    "Blend",
    "PoisonedSet",
    "TRIGGERS",
    "Trigger",
    "WaNet",
    "attack_success_rate",
    "backdoor_labels",
    "make_trigger",
    "poison",
    "triggered_test_set",
]
