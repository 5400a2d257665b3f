"""unmask.explain: attributions (Captum), explanation metrics, gradient-flow audit, plots."""

from .attribution import (
    METHODS,
    Baseline,
    IGResult,
    Output,
    attribute,
    input_x_gradient,
    integrated_gradients,
    make_baseline,
    saliency,
    smoothgrad,
)
from .branches import BranchAttribution, branch_attribution
from .gradflow import AuditLoss, GradFlowReport, ModuleFlow, NormStats, audit
from .jacobian import JacobianNorm, LayerNorm, jacobian_norm
from .metrics import (
    METRICS,
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
    "METHODS",
    "Output",
    "attribute",
    "input_x_gradient",
    "integrated_gradients",
    "make_baseline",
    "saliency",
    "smoothgrad",
    "METRICS",
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

# gradient-flow audit, branch attribution, Jacobian norm
__all__ += [
    "AuditLoss",
    "BranchAttribution",
    "GradFlowReport",
    "JacobianNorm",
    "LayerNorm",
    "ModuleFlow",
    "NormStats",
    "audit",
    "branch_attribution",
    "jacobian_norm",
]
