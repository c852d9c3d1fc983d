"""K-FAC: ``C ≈ A ⊗ B`` with ``A = E[h̄ h̄ᵀ]`` (layer inputs) and ``B = E[g gᵀ]`` (per-example output gradients).

Two inverse modes:

* ``"cholesky"`` (default): the factored damping of Martens & Grosse (2015),
  ``P·G = (B + ρ_B I)^{-1} G (A + ρ_A I)^{-1}`` with ``ρ_A = √ρ·π``, ``ρ_B = √ρ/π`` and
  ``π = √((tr A / dim A) / (tr B / dim B))``; two matrix products per step.
* ``"eigen"``: exactly ``(A ⊗ B + ρ I)^{-1}`` through ``A = Q_A Λ_A Q_Aᵀ``, ``B = Q_B Λ_B Q_Bᵀ``:
  ``P·G = Q_B [(Q_Bᵀ G Q_A) ⊘ (λ_B λ_Aᵀ + ρ)] Q_Aᵀ``; four matrix products per step.

A side wider than ``max_factor_dim`` (or an embedding's one-hot input side) is kept diagonal.

A weight with uses in both orientations (an embedding tied to the output head: ``W = weightᵀ`` is ``D x V``, the
embedding's one-hot rows on the vocabulary side ``V``, the head's inputs on ``D`` and its output gradients on
``V``) keeps one factor pair per orientation, in the weight's own coordinates: ``(B, A)`` from the normal uses and
``(A_t, B_t)`` from the transposed ones, each the sum over its uses' rows. The curvature of the sum of uses,
``C ≈ B ⊗ A + A_t ⊗ B_t`` (cross terms between uses dropped, as K-FAC drops them between positions), is not a
Kronecker product; it is approximated by one with the same trace (``combine_pairs``): with ``m(·)`` the mean
eigenvalue (trace / dimension), ``s_u = m(L_u) m(R_u)`` the mean eigenvalue of use ``u``'s product and
``w_u = s_u / Σ s``,

    L = Σ_u w_u L_u / m(L_u),    R = (Σ_u s_u) · Σ_u w_u R_u / m(R_u),

exact when there is one orientation or when the uses' normalised factors agree, and ``tr(L ⊗ R) = Σ_u tr(L_u ⊗ R_u)``
always. ``L`` (output side) and ``R`` (input side) then take the places of ``B`` and ``A`` above.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.capture.adapters import Count, Observation, Rows
from lightning_soo.capture.rows import RowCount
from lightning_soo.options import KFACOptions, StepOptions
from lightning_soo.preconditioners.banks import Sides, close_banked
from lightning_soo.preconditioners.base import Preconditioner, fit_square
from lightning_soo.preconditioners.statistics import Factor


def _mean(factor: Tensor) -> Tensor:
    """``tr / dim`` of a dense (2-D) or diagonal (1-D) factor, on the device."""
    return (factor.diagonal() if factor.dim() == 2 else factor).mean()


def _eig(factor: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(eigenvalues, eigenvectors or None for a diagonal factor)."""
    if factor.dim() == 1:
        return (factor.clamp(min=0), None) if linalg.all_finite(factor) else None
    return linalg.eigh(factor)


def _mean_eig(f: Tensor) -> Tensor:
    return (f if f.dim() == 1 else f.diagonal()).mean()


def _dense(f: Tensor) -> Tensor:
    return torch.diag(f) if f.dim() == 1 else f


def combine_pairs(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One Kronecker pair ``(L, R)`` standing for ``Σ_u L_u ⊗ R_u`` with the same trace (see the module docstring).
    A side stays diagonal only when it is diagonal in every pair."""
    if len(pairs) == 1:
        return pairs[0]
    means = [(_mean_eig(l_u).clamp(min=1e-30), _mean_eig(r_u).clamp(min=1e-30)) for l_u, r_u in pairs]
    sizes = [ml * mr for ml, mr in means]
    total = sum(sizes)
    diag_l = all(l_u.dim() == 1 for l_u, _ in pairs)
    diag_r = all(r_u.dim() == 1 for _, r_u in pairs)
    left: Tensor = 0  # type: ignore[assignment]
    right: Tensor = 0  # type: ignore[assignment]
    for (l_u, r_u), (ml, mr), s in zip(pairs, means, sizes, strict=True):
        left = left + (s / total) * (l_u if diag_l else _dense(l_u)) / ml
        right = right + (s / total) * (r_u if diag_r else _dense(r_u)) / mr
    return left, total * right  # type: ignore[return-value]


def _factor_value(attr: str) -> tuple[Any, Any]:
    """Getter and setter of the running value of the factor stored at ``attr`` (absent: None, ignored)."""

    def get(self: Any) -> Tensor | None:
        factor = self.__dict__.get(attr)
        return None if factor is None else factor.value

    def put(self: Any, value: Tensor | None) -> None:
        factor = self.__dict__.get(attr)
        if factor is not None:
            factor.value = value

    return get, put


class KFAC(Preconditioner):
    """Kronecker-factored empirical Fisher of one layer."""

    options_type = KFACOptions
    options: KFACOptions
    supports_transposed = True
    state_tensors = ("a", "b", "a_t", "b_t", "a_inv", "b_inv", "lam_a", "q_a", "lam_b", "q_b")
    symmetric_statistics = True  # Σ h̄h̄ᵀ and Σ ggᵀ
    lazy_counts = True  # its factors reduce the padding rule's counts when the statistics close (per bank)
    loss_examples = True  # B (Shampoo: both sides) averages the loss's examples, not the layer's rows
    count_scaled_rows = True  # B is quadratic in the output gradients: a count tensor is applied at the close
    state_numbers = ("damping", "rho_a", "rho_b")
    derived = ("a_inv", "b_inv", "lam_a", "q_a", "lam_b", "q_b", "damping", "rho_a", "rho_b")
    config_keys = ("inverse", "max_factor_dim")

    def build(self) -> None:
        self.factor_decay, self.inverse = self.options.factor_decay, self.options.inverse
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        wide = self.options.max_factor_dim
        self._a = Factor(self.d_in, diagonal=self.input_diagonal or self.d_in > wide, **kw)
        self._b = Factor(self.d_out, diagonal=self.d_out > wide, **kw)
        self._factors = [self._a, self._b]
        if self.transposed_uses:  # inputs of the transposed uses on the output side, their gradients on the input
            self._at = Factor(self.d_out, diagonal=self.d_out > wide, **kw)
            self._bt = Factor(self.d_in, diagonal=self.d_in > wide, **kw)
            self._factors += [self._at, self._bt]
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

    # statistics live in the factors; expose the running averages as attributes (None: no such factor)
    a = property(*_factor_value("_a"), doc="Input statistic A (input side).")
    b = property(*_factor_value("_b"), doc="Output-gradient statistic B (output side).")
    a_t = property(*_factor_value("_at"), doc="Input statistic of the transposed uses (output side).")
    b_t = property(*_factor_value("_bt"), doc="Output-gradient statistic of the transposed uses (input side).")

    def fit_statistic(self, name: str, saved: Tensor) -> Tensor:
        factor = getattr(self, {"a": "_a", "b": "_b", "a_t": "_at", "b_t": "_bt"}[name], None)
        if factor is None:
            raise ValueError(
                f"saved `{name}` is a statistic of uses in the swapped orientation this layer does not have"
            )
        return fit_square(name, saved, factor.dim, factor.diagonal)

    @property
    def diagonal_sides(self) -> tuple[bool, bool]:
        """(input side A diagonal, output side B diagonal)."""
        if self.transposed_uses:
            return self._a.diagonal and self._bt.diagonal, self._b.diagonal and self._at.diagonal
        return self._a.diagonal, self._b.diagonal

    def observe_inputs(self, rows: Rows, count: Count) -> None:
        self._a.add(rows, count)

    def observe_output_grads(
        self, rows: Tensor, n_examples: Count, ctx: Any, scale: float | Tensor | RowCount = 1.0
    ) -> None:
        if isinstance(scale, Tensor | RowCount):  # the count tensor: B takes its square at the close (``Factor.add``)
            self._b.add(rows, n_examples, squared=scale)
        else:
            self._b.add(rows, n_examples, scale * scale)

    def dense_ready(self) -> bool:
        return self._a.takes_first() and self._b.takes_first()

    def observe_dense(self, obs: Observation) -> None:
        self._a.add_first(obs.h, obs.rows)  # type: ignore[arg-type]  # dense rows, a number or a RowCount
        self._b.add_first(obs.d, obs.n, squared=True)  # type: ignore[arg-type]  # B is quadratic in the rows

    def observe_transposed(self, inputs: Rows, grads: Tensor, count: Count, n_examples: Count) -> None:
        self._at.add(inputs, count)
        self._bt.add(grads, n_examples)

    def _pairs_pending(self) -> list[tuple[Factor, Factor, bool]]:
        """(input factor, gradient factor, transposed) of each orientation with statistics this step."""
        pairs = [(self._a, self._b, False)]
        if self.transposed_uses:
            pairs.append((self._at, self._bt, True))
        return [(a, b, t) for a, b, t in pairs if a.pending and b.pending]

    def close_statistics(self, output_scale: float | Tensor) -> Tensor | bool | None:
        pending = self._pairs_pending()
        if not pending:
            self.discard_statistics()
            return None
        keep = linalg.finite(*(f.finite_probe for a, b, _ in pending for f in (a, b)))
        ok = True
        for a, b, _ in pending:
            ok = a.fold(self.factor_decay, 1.0, keep) and ok
            ok = b.fold(self.factor_decay, output_scale**2, keep) and ok  # B is quadratic in the output gradient
        if not ok:  # a first value was not finite: start again at the next statistics step
            for a, b, _ in pending:
                a.value = b.value = None
        folded = {id(f) for a, b, _ in pending for f in (a, b)}  # fold reset these already
        for f in self._factors:
            if id(f) not in folded:  # an orientation without both halves this step
                f.reset()
        return keep

    @classmethod
    def close_many(cls, pres: list[Preconditioner], output_scale: float | Tensor) -> list[Tensor | bool | None]:
        """Layers of equal factor shapes close as banks (``banks.close_banked``); the others one by one."""
        s2 = output_scale**2  # B is quadratic in the output gradient; one operation for all layers

        def sides(p: KFAC) -> Sides | None:
            return None if p.transposed_uses else [(p._a, 1.0), (p._b, s2)]

        return close_banked(pres, sides, lambda p: p.factor_decay, lambda p: p.close_statistics(output_scale))

    def statistics_tensors(self) -> list[Tensor]:
        return [t for f in self._factors for t in f.statistics_tensors()]

    def statistics_factors(self) -> list[tuple[Factor, bool]]:
        return [(f, f is self._b) for f in self._factors]  # B takes the loss's N; the swapped uses keep their own

    def discard_statistics(self) -> None:
        for f in self._factors:
            f.reset()

    def effective_factors(self) -> tuple[Tensor, Tensor] | None:
        """``(A, B)``: the input- and output-side factors the preconditioner is computed from (the uses of both
        orientations combined by ``combine_pairs``); None before statistics."""
        pairs = []
        if self.a is not None and self.b is not None:
            pairs.append((self.b, self.a))
        if self.a_t is not None and self.b_t is not None:
            pairs.append((self.a_t, self.b_t))
        if not pairs:
            return None
        left, right = combine_pairs(pairs)
        return right, left

    def refresh(self, damping: float) -> bool | None:
        return self.refresh_many([self], damping)[0]

    @classmethod
    def refresh_many(cls, pres: list[Preconditioner], damping: float) -> list[bool | None]:
        """Refresh every layer's inverses with one batched decomposition per factor shape."""
        kfacs = [p for p in pres if isinstance(p, KFAC)]
        factors = {id(p): f for p in kfacs if (f := p.effective_factors()) is not None}
        todo = [p for p in kfacs if id(p) in factors]
        done: dict[int, bool] = {}
        eigen = [p for p in todo if p.inverse == "eigen"]
        dense = [m for p in eigen for m in factors[id(p)] if m.dim() == 2]
        eigs = dict(zip((id(m) for m in dense), linalg.eigh_many(dense), strict=True))
        for p in eigen:
            ea, eb = (eigs[id(m)] if m.dim() == 2 else _eig(m) for m in factors[id(p)])
            if ea is not None and eb is not None:
                (p.lam_a, p.q_a), (p.lam_b, p.q_b) = ea, eb
            done[id(p)] = ea is not None and eb is not None
        chol = [p for p in todo if p.inverse != "eigen"]
        means = torch.stack([_mean(m) for p in chol for m in factors[id(p)]]).tolist() if chol else []
        shifts = {}
        for k, p in enumerate(chol):
            ma, mb = means[2 * k], means[2 * k + 1]
            pi = math.sqrt(ma / mb) if ma > 0 and mb > 0 and math.isfinite(ma / mb) else 1.0
            shifts[id(p)] = (math.sqrt(damping) * pi, math.sqrt(damping) / pi)
        mats = [(p, m, shifts[id(p)][j]) for p in chol for j, m in enumerate(factors[id(p)]) if m.dim() == 2]
        invs = linalg.damped_inverse_many([m for _, m, _ in mats], [r for _, _, r in mats])
        by_matrix = {id(m): inv for (_, m, _), inv in zip(mats, invs, strict=True)}
        for p in chol:
            ra, rb = shifts[id(p)]
            fa, fb = factors[id(p)]
            a_inv = 1.0 / (fa + ra) if fa.dim() == 1 else by_matrix[id(fa)]
            b_inv = 1.0 / (fb + rb) if fb.dim() == 1 else by_matrix[id(fb)]
            ok = a_inv is not None and b_inv is not None and (fa.dim() == 2 or linalg.all_finite(a_inv))
            ok = ok and (fb.dim() == 2 or linalg.all_finite(b_inv))  # dense inverses were checked in the batch
            if ok:
                p.a_inv, p.b_inv, p.rho_a, p.rho_b = a_inv, b_inv, ra, rb
            done[id(p)] = ok
        out: list[bool | None] = []
        for p in pres:
            if id(p) not in done:
                out.append(None)
            elif done[id(p)]:
                p.damping = p.applied_damping = float(damping)  # type: ignore[attr-defined]
                out.append(p.refreshed())
            else:
                out.append(False)
        return out

    def precondition(self, grad: Tensor) -> Tensor:
        g = grad.to(self.dtype)
        if self.inverse == "eigen":
            v = self._rotate(g, transpose=True)
            v = v / (torch.outer(self.lam_b, self.lam_a) + self.damping)
            return self._rotate(v, transpose=False)
        return linalg.right_mul(linalg.left_mul(self.b_inv, g), self.a_inv)

    def kronecker_operands(self) -> tuple[Tensor, Tensor] | None:
        if self.inverse == "eigen" or self.a_inv is None or self.b_inv is None:
            return None
        return (self.b_inv, self.a_inv) if self.a_inv.dim() == 2 and self.b_inv.dim() == 2 else None

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
