"""unmask.attacks: evasion attacks (one file each) and backdoor poisoning."""

__all__: list[str] = []
