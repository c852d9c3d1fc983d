"""K-FAC: ``C ≈ A ⊗ B`` with ``A = E[h̄ h̄ᵀ]`` (layer inputs) and ``B = E[g gᵀ]`` (per-example output gradients).

Two inverse modes:

* ``"cholesky"`` (default): the factored damping of Martens & Grosse (2015),
  ``P·G = (B + ρ_B I)^{-1} G (A + ρ_A I)^{-1}`` with ``ρ_A = √ρ·π``, ``ρ_B = √ρ/π`` and
  ``π = √((tr A / dim A) / (tr B / dim B))``; two matrix products per step.
* ``"eigen"``: exactly ``(A ⊗ B + ρ I)^{-1}`` through ``A = Q_A Λ_A Q_Aᵀ``, ``B = Q_B Λ_B Q_Bᵀ``:
  ``P·G = Q_B [(Q_Bᵀ G Q_A) ⊘ (λ_B λ_Aᵀ + ρ)] Q_Aᵀ``; four matrix products per step.

A side wider than ``max_factor_dim`` (or an embedding's one-hot input side) is kept diagonal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.capture.adapters import Rows
from lightning_soo.options import KFACOptions, StepOptions
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.preconditioners.statistics import Factor


def _eig(factor: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(eigenvalues, eigenvectors or None for a diagonal factor)."""
    if factor.dim() == 1:
        return (factor.clamp(min=0), None) if linalg.all_finite(factor) else None
    return linalg.eigh(factor)


class KFAC(Preconditioner):
    """Kronecker-factored empirical Fisher of one layer."""

    options_type = KFACOptions
    options: KFACOptions
    state_tensors = ("a", "b", "a_inv", "b_inv", "lam_a", "q_a", "lam_b", "q_b")
    symmetric_statistics = True  # Σ h̄h̄ᵀ and Σ ggᵀ
    state_numbers = ("damping", "rho_a", "rho_b")

    def build(self) -> None:
        self.factor_decay, self.inverse = self.options.factor_decay, self.options.inverse
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        wide = self.options.max_factor_dim
        self._a = Factor(self.d_in, diagonal=self.input_diagonal or self.d_in > wide, **kw)
        self._b = Factor(self.d_out, diagonal=self.d_out > wide, **kw)
        self.a_inv: Tensor | None = None
        self.b_inv: Tensor | None = None
        self.lam_a: Tensor | None = None
        self.q_a: Tensor | None = None
        self.lam_b: Tensor | None = None
        self.q_b: Tensor | None = None
        self.damping = self.rho_a = self.rho_b = 0.0

    @classmethod
    def one_hot_diagonal(cls, options: StepOptions) -> bool:
        return True  # E[h hᵀ] of one-hot rows is exactly diagonal

    # statistics live in the factors; expose the running averages as ``a`` and ``b``
    @property
    def a(self) -> Tensor | None:
        return self._a.value

    @a.setter
    def a(self, value: Tensor | None) -> None:
        self._a.value = value

    @property
    def b(self) -> Tensor | None:
        return self._b.value

    @b.setter
    def b(self, value: Tensor | None) -> None:
        self._b.value = value

    @property
    def diagonal_sides(self) -> tuple[bool, bool]:
        """(input side A diagonal, output side B diagonal)."""
        return self._a.diagonal, self._b.diagonal

    def observe_inputs(self, rows: Rows, n_examples: int) -> None:
        self._a.add(rows, rows.shape[0])

    def observe_output_grads(self, rows: Tensor, n_examples: int, ctx: Any) -> None:
        self._b.add(rows, n_examples)

    def close_statistics(self, output_scale: float) -> bool | None:
        if not (self._a.pending and self._b.pending):
            self.discard_statistics()
            return None
        if not linalg.all_finite(self._a.step_sum, self._b.step_sum):
            self.discard_statistics()
            return False
        self._a.fold(self.factor_decay)
        self._b.fold(self.factor_decay, output_scale**2)  # B is quadratic in the output gradient
        return True

    def statistics_tensors(self) -> list[Tensor]:
        return self._a.statistics_tensors() + self._b.statistics_tensors()

    def discard_statistics(self) -> None:
        self._a.reset()
        self._b.reset()

    def refresh(self, damping: float) -> bool | None:
        a, b = self.a, self.b
        if a is None or b is None:
            return None
        if self.inverse == "eigen":
            ea, eb = _eig(a), _eig(b)
            if ea is None or eb is None:
                return False
            self.lam_a, self.q_a = ea
            self.lam_b, self.q_b = eb
        else:
            ma, mb = linalg.mean_eigenvalue(a), linalg.mean_eigenvalue(b)
            pi = math.sqrt(ma / mb) if ma > 0 and mb > 0 else 1.0
            ra, rb = math.sqrt(damping) * pi, math.sqrt(damping) / pi
            a_inv = 1.0 / (a + ra) if a.dim() == 1 else linalg.damped_inverse(a, ra)
            b_inv = 1.0 / (b + rb) if b.dim() == 1 else linalg.damped_inverse(b, rb)
            if a_inv is None or b_inv is None or not linalg.all_finite(a_inv, b_inv):
                return False
            self.a_inv, self.b_inv = a_inv, b_inv
            self.rho_a, self.rho_b = ra, rb
        self.damping = self.applied_damping = float(damping)
        return self.refreshed()

    def precondition(self, grad: Tensor) -> Tensor:
        g = grad.to(self.dtype)
        if self.inverse == "eigen":
            v = self._rotate(g, transpose=True)
            v = v / (torch.outer(self.lam_b, self.lam_a) + self.damping)
            return self._rotate(v, transpose=False)
        return linalg.right_mul(linalg.left_mul(self.b_inv, g), self.a_inv)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        if self.inverse == "eigen":
            w = self._rotate(v, transpose=True)
            w = w * (torch.outer(self.lam_b, self.lam_a) + self.damping)
            return self._rotate(w, transpose=False)
        left = v / self.b_inv.unsqueeze(1) if self.b_inv.dim() == 1 else torch.linalg.solve(self.b_inv, v)
        return left / self.a_inv if self.a_inv.dim() == 1 else torch.linalg.solve(self.a_inv, left.mT).mT

    def refresh_cost(self) -> float:
        a_diag, b_diag = self.diagonal_sides
        return float((0 if a_diag else self.d_in**3) + (0 if b_diag else self.d_out**3)) + 1.0

    def inverse_tensors(self) -> list[Tensor]:
        a_diag, b_diag = self.diagonal_sides
        da, db = self.d_in, self.d_out
        if self.inverse == "eigen":
            spec = [("lam_a", (da,)), ("q_a", None if a_diag else (da, da)), ("lam_b", (db,))]
            spec.append(("q_b", None if b_diag else (db, db)))
        else:
            spec = [("a_inv", (da,) if a_diag else (da, da)), ("b_inv", (db,) if b_diag else (db, db))]
        header = self._header_tensor(self.damping, self.rho_a, self.rho_b)
        return [header, *(self._shareable(name, shape) for name, shape in spec if shape is not None)]

    def inverse_tensors_loaded(self) -> None:
        self.damping, self.rho_a, self.rho_b = self._read_header()
        self.applied_damping = self.damping
        self._spectrum = None

    def spectrum(self) -> Tensor | None:
        """Eigenvalues of the damped curvature (factored damping: (λ_B+ρ_B)(λ_A+ρ_A)); computed on demand."""
        if not self.ready:
            return None
        if self._spectrum is None:
            if self.inverse == "eigen":
                self._spectrum = (torch.outer(self.lam_b, self.lam_a) + self.damping).reshape(-1)
            else:  # eigenvalues of the damped factors from their inverses (dense: eigvalsh; diagonal: as is)
                ea = 1.0 / (self.a_inv if self.a_inv.dim() == 1 else torch.linalg.eigvalsh(self.a_inv))
                eb = 1.0 / (self.b_inv if self.b_inv.dim() == 1 else torch.linalg.eigvalsh(self.b_inv))
                self._spectrum = torch.outer(eb, ea).reshape(-1)
        return self._spectrum

    def _rotate(self, g: Tensor, transpose: bool) -> Tensor:
        """``Q_Bᵀ G Q_A`` (transpose) or ``Q_B G Q_Aᵀ``; diagonal sides have identity eigenvectors."""
        if self.q_b is not None:
            g = (self.q_b.mT if transpose else self.q_b) @ g
        if self.q_a is not None:
            g = g @ (self.q_a if transpose else self.q_a.mT)
        return g
