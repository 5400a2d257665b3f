"""unmask.explain: attributions (Captum), explanation metrics, gradient-flow audit, plots."""

__all__: list[str] = []
