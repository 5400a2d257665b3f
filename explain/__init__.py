"""unmask.explain: attributions (Captum), explanation metrics, gradient-flow audit, plots."""

from .attribution import (
    Baseline,
    IGResult,
    Method,
    Output,
    attribute,
    input_x_gradient,
    integrated_gradients,
    make_baseline,
    saliency,
    smoothgrad,
)
from .metrics import (
    AttributionChangeResult,
    CompletenessResult,
    DeletionInsertionResult,
    RandomisationResult,
    SensitivityResult,
    TriggerLocalisationResult,
    attribution_change,
    completeness,
    deletion_insertion,
    max_sensitivity,
    model_randomisation,
    spearman,
    topk_intersection,
    trigger_localisation,
)
from .plots import plot_attributions, plot_curves

__all__: list[str] = []

# attributions, metrics, plots
__all__ += [
    "Baseline",
    "IGResult",
    "Method",
    "Output",
    "attribute",
    "input_x_gradient",
    "integrated_gradients",
    "make_baseline",
    "saliency",
    "smoothgrad",
    "AttributionChangeResult",
    "CompletenessResult",
    "DeletionInsertionResult",
    "RandomisationResult",
    "SensitivityResult",
    "TriggerLocalisationResult",
    "attribution_change",
    "completeness",
    "deletion_insertion",
    "max_sensitivity",
    "model_randomisation",
    "spearman",
    "topk_intersection",
    "trigger_localisation",
    "plot_attributions",
    "plot_curves",
]
