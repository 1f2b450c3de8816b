"""Orthogonal Hadamard matrices of the orders decoders use, as Kronecker factors: Sylvester's for powers of
two, Paley's for 12 and 20 (576 = 12 x 12 x 4, 1536 = 12 x 128), and the online transform that applies
them factor by factor, so an ONNX graph holds a few small MatMuls instead of one dense ``n x n`` matrix."""

from __future__ import annotations

import math

import torch
from torch import nn

# Paley's construction I needs a prime q = 3 (mod 4); it gives a Hadamard matrix of order q + 1
PALEY_PRIMES = {12: 11, 20: 19}


def _sylvester(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n`` (a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of ``order`` (12 or 20) from the quadratic residues modulo ``order - 1``."""
    q = PALEY_PRIMES[order]
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    core = torch.zeros(order, order, dtype=torch.float64)
    core[0, 1:] = 1
    core[1:, 0] = -1
    core[1:, 1:] = jacobsthal
    return core + torch.eye(order, dtype=torch.float64)


def factor_orders(n: int) -> list[int] | None:
    """``n`` as a product of Paley orders (12, 20) and one power of two; None when it is not one."""
    orders = []
    rest = n
    while rest & (rest - 1):  # not a power of two yet
        paley = next((p for p in PALEY_PRIMES if rest % p == 0), None)
        if paley is None:
            return None
        orders.append(paley)
        rest //= paley
    return orders + ([rest] if rest > 1 else [])


def hadamard_factors(n: int) -> list[torch.Tensor]:
    """Orthogonal factors (±1 / sqrt(order)) whose Kronecker product is a Hadamard matrix of order ``n``."""
    orders = factor_orders(n)
    if orders is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester and Paley factors (12, 20, powers of 2)")
    return [(_sylvester(o) if o & (o - 1) == 0 else _paley(o)) / math.sqrt(o) for o in orders]


def kronecker(factors: list[torch.Tensor]) -> torch.Tensor:
    """The dense matrix of Kronecker factors."""
    dense = torch.ones(1, 1, dtype=factors[0].dtype)
    for factor in factors:
        dense = torch.kron(dense, factor)
    return dense


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A randomised Hadamard matrix ``H diag(±1)`` where one of order ``n`` is known, else a random orthogonal
    matrix (QR of a Gaussian, signs fixed): both spread an outlier channel over all channels (float64)."""
    if factor_orders(n) is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return kronecker(hadamard_factors(n)) * signs
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class OnlineHadamard(nn.Module):
    """``x @ kron(F_1, ..., F_k)`` over the last axis, computed one factor at a time on ``x`` viewed as
    ``[..., o_1, ..., o_k]`` (the weight after it carries the same matrix, so the pair computes the original
    function). Exported as Reshape / Transpose / MatMul, which both graph flavours run in float."""

    def __init__(self, n: int) -> None:
        super().__init__()
        factors = hadamard_factors(n)
        self.orders = [f.shape[0] for f in factors]
        for i, factor in enumerate(factors):
            self.register_buffer(f"factor{i}", factor.float())

    def matrix(self) -> torch.Tensor:
        """The dense ``n x n`` matrix this module multiplies by (for folding into the next weight)."""
        return kronecker([getattr(self, f"factor{i}").double() for i in range(len(self.orders))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._multiply(x, transpose=False)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ kron(F_1, ..., F_k)^T``: undoes :meth:`forward` (the factors are orthogonal)."""
        return self._multiply(x, transpose=True)

    def _multiply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x.reshape(*lead, *self.orders)
        k = len(self.orders)
        last = y.dim() - 1
        for i in range(k):  # axis last - (k - 1) + i holds factor i's index (positive axes: ONNX's Transpose)
            factor = getattr(self, f"factor{i}").to(x.dtype)
            factor = factor.t() if transpose else factor
            axis = last - (k - 1) + i
            if axis == last:
                y = torch.matmul(y, factor)
            else:
                y = torch.matmul(y.transpose(axis, last), factor).transpose(axis, last)
        return y.reshape(x.shape)
