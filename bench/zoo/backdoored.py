"""The ``"backdoor"`` training recipe and the backdoored zoo entries.

The recipe poisons the training split with :func:`~unmask.attacks.backdoor.poison` and trains
with the standard cross-entropy loss through :func:`unmask.bench.core.training.fit`, so a
backdoored entry differs from its clean reference only in the data. Its card carries the
poisoning (count, rate, trigger) and, with ``eval_dataset``, the attack success rate.

Entries (registered when ``unmask.attacks`` is imported; same ``SmallCNN``, seed, epochs,
batch size and learning rate as ``mnist-cnn``):

* ``mnist-cnn-badnets``  BadNets 3 x 3 white patch, 5% poison, all-to-one to class 0;
* ``mnist-cnn-blend``    Blend with uniform noise at alpha 0.2, 5% poison, all-to-one to 0.

Usage: ``zoo.load("mnist-cnn-badnets")``; ``unmask backdoor mnist-cnn-badnets``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from ...attacks.backdoor import Backdoor
from .. import data
from ..core import make_generator
from ..core.training import cross_entropy_loss, fit, register_recipe
from .archs import SmallCNN
from .registry import register_model

__all__ = ["backdoor_recipe"]

log = logging.getLogger(__name__)


@register_recipe("backdoor", label="backdoor")
def backdoor_recipe(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
                    lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
                    trigger: str = "badnets", trigger_options: dict | None = None,
                    poison_rate: float = 0.05, target: int = 0, mode: str = "all-to-one",
                    num_classes: int | None = None, poison_seed: int | None = None,
                    eval_dataset: str | None = None, clean_reference: str | None = None,
                    **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Poison ``(x, y)`` and train on it with cross-entropy (Adam, cosine learning rate).

    Args:
        trigger, trigger_options: the trigger by name (``"badnets"``, ``"blend"``,
            ``"wanet"``) and its constructor options.
        poison_rate, target, mode, num_classes: see :func:`~unmask.attacks.backdoor.poison`.
        poison_seed: seeds the choice of poisoned samples; default: the training generator
            (which then goes on to shuffle the batches).
        eval_dataset: a registered dataset whose test split measures the ASR for the card.
        clean_reference: the clean zoo entry this one is compared with (recorded only).
        Other arguments as for the ``"standard"`` recipe.

    Returns:
        ``(model, metrics)``; the metrics land on the zoo card.
    """
    backdoor = Backdoor.from_options(trigger, trigger_options=trigger_options,
                                     poison_rate=poison_rate, target=target, mode=mode,
                                     num_classes=num_classes)
    g = make_generator(generator)
    pg = make_generator(poison_seed) if poison_seed is not None else g
    poisoned = backdoor.poison(x, y, generator=pg)
    log.info("poisoned %d of %d training samples with %r (%s)", len(poisoned.indices), len(y),
             backdoor.trigger, backdoor.mode.value)
    model = fit(model, poisoned.x, poisoned.y, cross_entropy_loss, epochs=epochs,
                batch_size=batch_size, lr=lr, generator=g, progress=progress,
                checkpoint_dir=checkpoint_dir, desc="backdoor", **options)
    metrics: dict[str, Any] = {**backdoor.config(), "poisoned": len(poisoned.indices),
                               "train_samples": len(y)}
    if clean_reference is not None:
        metrics["clean_reference"] = clean_reference
    if eval_dataset is not None:

        x_test, y_test = data.load(eval_dataset, "test")
        metrics["attack_success_rate"] = backdoor.attack_success_rate(model, x_test, y_test)
    return model, metrics


# --- zoo entries ----------------------------------------------------------------------------
# Training settings mirror mnist-cnn in bench/zoo/standard.py exactly (a test keeps them in step), so the
# clean-accuracy cost is the poisoning's alone.

_MNIST = dict(dataset="mnist5k", recipe="backdoor", epochs=6, seed=0, batch_size=64, lr=2e-3,
              poison_rate=0.05, target=0, mode="all-to-one", eval_dataset="mnist5k",
              clean_reference="mnist-cnn")


@register_model("mnist-cnn-badnets", trigger="badnets", tags=("backdoor", "mnist"), **_MNIST)
def mnist_cnn_badnets() -> nn.Module:
    """Small CNN on mnist5k with a BadNets backdoor (3x3 patch, 5% poison, target 0)."""
    return SmallCNN()


@register_model("mnist-cnn-blend", trigger="blend", trigger_options={"alpha": 0.2, "seed": 0},
                tags=("backdoor", "mnist"), **_MNIST)
def mnist_cnn_blend() -> nn.Module:
    """Small CNN on mnist5k with a Blend backdoor (noise at alpha 0.2, 5% poison, target 0)."""
    return SmallCNN()
