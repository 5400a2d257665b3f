"""EOT: Expectation over Transformation (Athalye et al., ICML 2018); documented on
:class:`EOT`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bench.core import AttackResult, check_inputs, make_generator, margin, model_mode
from .base import Attack, GradientOracle, WrapperAttack, register_attack
from .pgd import _positive_int

__all__ = ["EOT", "success_rate"]


@torch.no_grad()
def success_rate(model: nn.Module, x_adv: Tensor, y: Tensor, *, targets: Tensor | None = None,
                 transform=None, draws: int = 32, generator: torch.Generator | None = None,
                 batch_size: int = 1024) -> Tensor:
    """Per-sample share of ``draws`` random draws (of ``transform`` and the model's own
    randomness) under which ``x_adv`` reaches the attack goal. Float ``N`` in [0, 1]."""
    draws = _positive_int(draws, "draws")
    hits = torch.zeros(x_adv.shape[0], device=x_adv.device)
    with model_mode(model):
        for start in range(0, x_adv.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            xb, yb = x_adv[sl], y[sl]
            tb = targets[sl] if targets is not None else None
            k = max(1, min(draws, batch_size // max(1, xb.shape[0])))
            done = 0
            while done < draws:
                reps = min(k, draws - done)
                xs = xb.repeat(reps, 1, 1, 1)
                if transform is not None:
                    xs = transform(xs, generator)
                logits = model(xs)
                m = margin(logits, yb.repeat(reps), tb.repeat(reps) if tb is not None else None)
                hits[sl] += (m.view(reps, -1) < 0).float().sum(0)
                done += reps
    return hits / draws


@register_attack("eot")
class EOT(WrapperAttack):
    """EOT: Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok, "Synthesizing
    Robust Adversarial Examples", ICML 2018; and Athalye, Carlini & Wagner, "Obfuscated
    Gradients Give a False Sense of Security", ICML 2018, for randomised defenses).

    Threat model: white-box against a randomised model or input transformation; the wrapped
    attack's ball and loss, success judged in expectation over the randomness.

    Wraps any gradient attack so that every gradient (and the margin used to keep the best
    iterate) is the average over ``samples`` draws of a random transformation (or of the model's
    own randomness when ``transform`` is None): the ``samples`` copies are stacked along the batch
    dimension and run in one forward pass. The result reports success in expectation:
    ``expected_success`` is the share of ``eval_draws`` fresh random draws under which ``x_adv``
    still fools the model, and ``success`` means a majority of them (``>= 0.5``).

    Args:
        attack: a gradient attack (FGSM, PGD, APGD, APGDT, BPDA, ...), not mutated.
        transform: a :mod:`unmask.attacks.transforms` transform, or None (default) for the
            model's own randomness.
        samples: draws per gradient (default 10).
        eval_draws: fresh draws to measure success in expectation (default 32).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult` with ``expected_success`` float N.

    Usage: ``EOT(PGD(Threat("linf", 0.3)), samples=10)(noisy_model, x, y, generator=g)``
    """

    name = "eot"

    def __init__(self, attack: Attack, transform=None, samples: int = 10,
                 eval_draws: int = 32) -> None:
        super().__init__(attack)
        self.transform = transform
        self.samples = _positive_int(samples, "samples")
        self.eval_draws = _positive_int(eval_draws, "eval_draws")

    def config(self):
        t = self.transform.config() if hasattr(self.transform, "config") else repr(self.transform)
        return {**self.attack.config(), "attack": self.label, "eot_samples": self.samples,
                "transform": t, "eval_draws": self.eval_draws}

    def run(self, model, x, y, *, targets=None, generator=None, oracle=None) -> AttackResult:
        generator = make_generator(0 if generator is None else generator)
        oracle = GradientOracle(samples=self.samples, transform=self.transform)
        result = self.attack.run(model, x, y, targets=targets, generator=generator, oracle=oracle)
        x, y = check_inputs(x, y, model=model)
        rates = success_rate(model, result.x_adv, y, targets=targets, transform=self.transform,
                             draws=self.eval_draws, generator=generator)
        result.forwards = result.forwards + self.eval_draws
        result.expected_success = rates
        result.success = rates >= 0.5
        result.name, result.config = self.name, self.config()
        return result
