"""unmask.defenses: training recipes, inference-time defenses, gradient-masking diagnosis."""

__all__: list[str] = []
