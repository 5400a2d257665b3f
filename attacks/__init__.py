"""unmask.attacks: evasion attacks (one file each) and backdoor poisoning."""

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
from .backdoor_zoo import backdoor_recipe  # registers the "backdoor" recipe and zoo entries

__all__: list[str] = []
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
    "backdoor_recipe",
    "make_trigger",
    "poison",
    "triggered_test_set",
]
