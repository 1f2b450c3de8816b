"""SAM's perturbation and update on a quadratic with a known answer."""

from __future__ import annotations

import pytest
import torch

from calib.sam import SAM


def _closure(loss_fn):
    """A SAM closure: the loss and its gradients."""

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def test_sam_step_on_a_quadratic_matches_the_closed_form():
    """L(w) = 0.5 * w^T A w. g = A w; e = rho g/|g|; the update uses A (w + e); SGD: w' = w - lr A (w + e)."""
    a = torch.diag(torch.tensor([1.0, 4.0]))
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    rho, lr = 0.1, 0.05
    sam = SAM([w], torch.optim.SGD([w], lr=lr), rho=rho, adaptive=False)
    loss = sam.step(_closure(lambda: 0.5 * w @ a @ w))
    g = torch.tensor([1.0, 4.0])
    e = rho * g / g.norm()
    expected = torch.tensor([1.0, 1.0]) - lr * (a @ (torch.tensor([1.0, 1.0]) + e))
    assert loss.item() == pytest.approx(2.5)
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_adaptive_perturbation_scales_with_the_parameter():
    """ASAM: e = rho |w|^2 g / || |w| g ||, so a parameter 100x smaller moves 100^2 x less for the same g."""
    w = torch.nn.Parameter(torch.tensor([1.0, 0.01]))
    w.grad = torch.tensor([1.0, 1.0])
    sam = SAM([w], torch.optim.SGD([w], lr=0.1), rho=0.05, adaptive=True)
    (e,) = sam.perturbation()
    norm = torch.tensor([1.0, 0.01]).norm()
    assert torch.allclose(e, 0.05 * torch.tensor([1.0, 1e-4]) / norm)


def test_sam_reaches_the_minimum_of_a_quadratic():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    sam = SAM([w], torch.optim.SGD([w], lr=0.2), rho=0.05, adaptive=False)
    for _ in range(200):
        sam.step(_closure(lambda: (w**2).sum()))
    assert w.detach().abs().max() < 0.05  # SAM oscillates within ~rho of the minimum
