"""Pictures of explanations: attribution grids and deletion/insertion curves.

* :func:`plot_attributions`  one row per sample: the input, each method's map on it, and (when
  given) the adversarial example with each method's map on it;
* :func:`plot_curves`        deletion and insertion curves (Petsiuk et al. 2018) of several
  methods against the random-attribution baseline, AUCs in the legend.

Figures are drawn with matplotlib's object API (no pyplot global state, no display needed) and
written atomically to the path the caller gives; the format follows its suffix (PNG by
default). Usage::

    plot_attributions(x, {"ig": ig}, "results/figures/ig.png", x_adv=x_adv, adv_maps={"ig": ig_adv})
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..bench.core.fileio import atomic_write
from .metrics import DeletionInsertionResult

__all__ = ["plot_attributions", "plot_curves"]


def _save(fig, path: str | os.PathLike) -> Path:
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    fmt = out.suffix.lstrip(".").lower() or "png"
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    atomic_write(out, lambda fh: fig.savefig(fh, format=fmt, dpi=fig.dpi, bbox_inches="tight"))
    return out


def _image(t: Tensor):
    """``C x H x W`` -> something ``imshow`` takes (H x W grayscale or H x W x 3)."""
    t = t.detach().float().cpu().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t[:3].permute(1, 2, 0).numpy()


def _show_map(ax, a: Tensor) -> None:
    m = a.detach().float().cpu()
    m = m.sum(0) if m.dim() == 3 else m
    signed = bool((m < 0).any())
    scale = torch.quantile(m.abs().flatten(), 0.99).item() or m.abs().max().item() or 1.0
    if signed:
        ax.imshow(m.numpy(), cmap="bwr", vmin=-scale, vmax=scale)
    else:
        ax.imshow(m.numpy(), cmap="magma", vmin=0.0, vmax=scale)


def _check_maps(maps: Mapping[str, Tensor], x: Tensor, what: str) -> None:
    for name, a in maps.items():
        if not isinstance(a, Tensor) or a.shape[0] != x.shape[0] or a.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"{what}[{name!r}] must be a tensor of shape {tuple(x.shape)}, got "
                             f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")


def plot_attributions(x: Tensor, maps: Mapping[str, Tensor], path: str | os.PathLike, *,
                      x_adv: Tensor | None = None, adv_maps: Mapping[str, Tensor] | None = None,
                      labels: Tensor | None = None, preds: Tensor | None = None,
                      adv_preds: Tensor | None = None, title: str | None = None) -> Path:
    """Draw inputs, adversarial examples and each method's maps for both; save to ``path``.

    Columns: input, one per method in ``maps``, then (with ``x_adv``) the adversarial example
    and one per method in ``adv_maps``. Maps are channel-summed; signed maps use a diverging
    colour map centred at 0, non-negative ones a sequential one, each scaled to its own 99th
    percentile of ``|a|``.

    Args:
        x: ``N x C x H x W`` in [0, 1].
        maps: method name -> ``N x C x H x W`` attributions of ``x``.
        path: output file (parents created, written atomically).
        x_adv: optional ``N x C x H x W`` adversarial examples of ``x``.
        adv_maps: method name -> attributions of ``x_adv``.
        labels, preds, adv_preds: optional int ``N`` shown in the column titles.
        title: figure title.

    Returns the written path. Usage: ``plot_attributions(x, {"saliency": s}, "fig.png")``.
    """
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib.figure import Figure

    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError("x must be a tensor of shape N x C x H x W")
    if not maps:
        raise ValueError("maps must name at least one method")
    _check_maps(maps, x, "maps")
    adv_maps = dict(adv_maps or {})
    if adv_maps and x_adv is None:
        raise ValueError("adv_maps were given without x_adv")
    if x_adv is not None:
        if x_adv.shape != x.shape:
            raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(x_adv.shape)}")
        _check_maps(adv_maps, x, "adv_maps")
    n = x.shape[0]
    columns: list[tuple[str, Tensor, str]] = [("input", x, "image")]
    columns += [(name, a, "map") for name, a in maps.items()]
    if x_adv is not None:
        columns.append(("adversarial", x_adv, "image"))
        columns += [(f"{name} (adv)", a, "map") for name, a in adv_maps.items()]
    fig = Figure(figsize=(1.6 * len(columns), 1.7 * n + (0.4 if title else 0.0)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        for j, (name, t, kind) in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if kind == "image":
                img = _image(t[i])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                parts = []
                if name == "input":
                    if labels is not None:
                        parts.append(f"y={int(labels[i])}")
                    if preds is not None:
                        parts.append(f"pred={int(preds[i])}")
                elif adv_preds is not None:
                    parts.append(f"pred={int(adv_preds[i])}")
                ax.set_title(" ".join(parts) if i else " ".join([name, *parts]), fontsize=7)
            else:
                _show_map(ax, t[i])
                if i == 0:
                    ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_curves(results: Mapping[str, DeletionInsertionResult], path: str | os.PathLike, *,
                title: str | None = None) -> Path:
    """Deletion and insertion curves (mean over samples) of each method, with the random
    baseline of the first result dashed; AUCs in the legends. Saved to ``path``.

    Args:
        results: method name -> :class:`~unmask.explain.metrics.DeletionInsertionResult`.
        path: output file (parents created, written atomically).
        title: figure title.

    Returns the written path. Usage: ``plot_curves({"ig": deletion_insertion(...)}, "c.png")``.
    """
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("results must hold at least one DeletionInsertionResult")
    for name, r in results.items():
        if not isinstance(r, DeletionInsertionResult):
            raise TypeError(f"results[{name!r}] must be a DeletionInsertionResult, got "
                            f"{type(r).__name__}")
    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    ax_del, ax_ins = fig.subplots(1, 2)
    panels: Sequence = (
        (ax_del, "deletion (lower is better)", "deletion", "deletion_auc"),
        (ax_ins, "insertion (higher is better)", "insertion", "insertion_auc"),
    )
    first = next(iter(results.values()))
    for ax, panel_title, curve, auc in panels:
        for name, r in results.items():
            f = r.fractions.cpu()
            ax.plot(f, getattr(r, curve).mean(0).cpu(),
                    label=f"{name} (AUC {float(getattr(r, auc).mean()):.3f})")
        f = first.fractions.cpu()
        ax.plot(f, getattr(first, f"random_{curve}").mean(0).cpu(), "k--",
                label=f"random (AUC {float(getattr(first, f'random_{auc}').mean()):.3f})")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(f"share of pixels {'deleted' if curve == 'deletion' else 'inserted'}")
        ax.set_ylabel("p(target)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
