"""Sharpness-aware minimisation (SAM, arXiv 2010.01412; ASAM, arXiv 2102.11600) around any base optimiser:
gradient at w, step to w + e (e = rho g / ||g||, or rho |w|^2 g / || |w| g || adaptive), gradient there,
back to w, base step with that second gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch


class SAM:
    """Wraps ``base`` (built over ``params``); :meth:`step` runs the two forward/backward passes."""

    def __init__(self, params: list[torch.nn.Parameter], base: torch.optim.Optimizer, rho: float, adaptive: bool):
        self.params, self.base, self.rho, self.adaptive = params, base, rho, adaptive

    @torch.no_grad()
    def perturbation(self) -> list[torch.Tensor]:
        """``e`` for the current gradients (zeros where a parameter has none)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        scaled = [g * p.abs() if self.adaptive else g for g, p in zip(grads, self.params)]
        norm = torch.sqrt(sum((s * s).sum() for s in scaled)).clamp(min=1e-12)
        return [self.rho * s * (p.abs() if self.adaptive else 1.0) / norm for s, p in zip(scaled, self.params)]

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One SAM step; ``closure`` computes the loss and its gradients into ``.grad`` (called twice: a
        data-parallel closure also averages them over ranks). Returns the loss at the unperturbed point."""
        self.base.zero_grad(set_to_none=True)
        loss = closure()
        offsets = self.perturbation()
        with torch.no_grad():
            for p, e in zip(self.params, offsets):
                p.add_(e)
        self.base.zero_grad(set_to_none=True)
        closure()
        with torch.no_grad():
            for p, e in zip(self.params, offsets):
                p.sub_(e)
        self.base.step()
        return loss.detach()
