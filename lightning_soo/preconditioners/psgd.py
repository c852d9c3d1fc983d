"""PSGD with a Kronecker-factored preconditioner (Li, 2017): ``P = QᵀQ``, ``Q = Q_l ⊗ Q_r`` upper triangular,
``P·G = Q_lᵀ Q_l G Q_rᵀ Q_r``, fitted a little at a time by Li's criterion

    c(P) = E[hᵀ P h + vᵀ P⁻¹ v],

minimised by ``P = E[h hᵀ]^(-1/2)`` for independent ``v ~ N(0, I)``. Two ways to get the pairs:

* ``fit="whitening"`` (default): ``h`` is the mini-batch gradient. No extra pass; ``P`` whitens the gradients
  (``E[P g gᵀ P] = I`` at the fixed point).
* ``fit="hessian"`` (Newton form): ``(v, h) = (δθ, H δθ)`` from a Hessian-vector product on the batch
  (``fit_hessian``); ``P`` tends to ``|H|⁻¹``: the criterion of the seed's Figure 2.

One update per pair, the relative step ``lr_preconditioner`` normalised by a lower bound of the spectral norm of
the criterion's gradient (Li's "2nd" normaliser):

    A = Q_l G Q_rᵀ,  B = Q_l⁻ᵀ V Q_r⁻¹,
    Q_l ← Q_l − μ / ‖AAᵀ + BBᵀ‖ · triu(AAᵀ − BBᵀ) Q_l,   Q_r likewise with AᵀA and BᵀB.

A side wider than ``max_factor_dim`` keeps a diagonal ``q``. Updates happen with the probability schedule of
Li's and Walters' Kron (``p = clamp(p_max·exp(−decay·(t − flat)), p_min, p_max)``), realised deterministically
(an update whenever the accumulated probability reaches 1), so ranks and reruns agree; probes come from a private
generator. Refresh forms ``Q_lᵀQ_l`` and ``Q_rᵀQ_r`` when Q changed since the last refresh.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.linalg import left_mul, right_mul
from lightning_soo.options import PSGDOptions
from lightning_soo.preconditioners.base import Preconditioner, fit_square
from lightning_soo.preconditioners.psgd_math import (
    criterion_terms,
    factor_gram,
    fit_stacked,
    fit_stacked_diagonal,
    norm_lower_bound,
    solve_left_t,
    solve_right,
    triu_matmul,
)

__all__ = ["PSGD", "norm_lower_bound", "triu_matmul", "update_probability"]


def update_probability(step: int, p_max: float, p_min: float, decay: float, flat: int) -> float:
    """Kron's schedule: ``p_max`` for ``flat`` steps, then decaying exponentially to ``p_min``."""
    return min(p_max, max(p_min, p_max * math.exp(-decay * (step - flat))))


class PSGD(Preconditioner):
    """Kronecker-factored PSGD preconditioner of one layer."""

    options_type = PSGDOptions
    options: PSGDOptions
    vectors_diagonal = True  # as Li's Kron and heavyball's: a norm's scale gets a diagonal Q
    state_numbers = ("updates", "steps_seen", "accumulated")
    state_tensors = ("q_l", "q_r", "p_l", "p_r")
    derived = ("p_l", "p_r")
    config_keys = ("max_factor_dim",)

    def build(self) -> None:
        o = self.options
        self.fit, self.lr_preconditioner, self.init_scale = o.fit, o.lr_preconditioner, o.init_scale
        self.schedule = (o.max_update_probability, o.min_update_probability, o.update_decay, o.flat_steps)
        self.uses_hooks, self.uses_grad = False, o.fit == "whitening"
        d_out, d_in = self.d_out, self.d_in
        vector = self.input_diagonal and d_out == 1  # a vector parameter: its Q diagonal, the left one a scalar
        self.diag_l, self.diag_r = d_out > o.max_factor_dim or vector, d_in > o.max_factor_dim or self.input_diagonal
        self.q_l: Tensor | None = None
        self.q_r: Tensor | None = None
        self.p_l: Tensor | None = None  # Q_lᵀQ_l, formed at refresh
        self.p_r: Tensor | None = None
        self.updates = 0  # fitting steps taken
        self.steps_seen = 0  # statistics steps seen (the schedule's clock)
        self.accumulated = 0.0  # accumulated update probability
        self._dirty = False
        self._pair: tuple[Tensor | None, Tensor] | None = None
        self._ranks: Tensor | None = None  # number of ranks whose Hv were summed into the pending pair
        self.generator = torch.Generator(device=self.device).manual_seed(o.seed * 1_000_003 + d_out * 4099 + d_in)
        self.tiny = torch.finfo(self.dtype).tiny

    # -- the schedule ---------------------------------------------------------------------------------
    def update_due(self) -> bool:
        """The next statistics step updates Q (always the first one)."""
        p = update_probability(self.steps_seen, *self.schedule)
        return self.updates == 0 or self.accumulated + p >= 1.0

    def _advance(self) -> bool:
        due = self.update_due()
        self.accumulated += update_probability(self.steps_seen, *self.schedule)
        if due:
            self.accumulated = max(0.0, self.accumulated - 1.0)
        self.steps_seen += 1
        return due

    # -- statistics -------------------------------------------------------------------------------------
    def probe(self) -> Tensor:
        """A standard Gaussian ``V`` in the gradient-matrix shape from the private generator."""
        return torch.randn(
            (self.d_out, self.d_in), generator=self.generator, dtype=self.dtype, device=self.generator.device
        ).to(self.device)

    def observe_grad(self, grad: Tensor) -> None:
        self._pair = (None, grad)

    def observe_hvp(self, v: Tensor, hv: Tensor) -> None:
        """A Newton-form pair: the probe ``v`` (from ``probe``) and ``H v``."""
        self._pair = (v.to(self.dtype), hv.to(self.dtype).contiguous())

    def statistics_tensors(self) -> list[Tensor]:
        """Whitening: nothing (the gradient is already all-reduced). Newton form: the pending ``H v`` and a count,
        summed across ranks (every rank drew the same probe) and averaged in ``close_statistics``."""
        if self.fit == "whitening" or self._pair is None:
            return []
        self._ranks = torch.ones((), dtype=self.dtype, device=self.device)
        return [self._pair[1], self._ranks]

    def close_statistics(self, output_scale: float | Tensor) -> Tensor | bool | None:
        pair = self._take()
        return None if pair is None else self._fit_pair(*pair)

    def _take(self) -> tuple[Tensor, Tensor] | None:
        """This step's pair ``(V, H)`` when the schedule fits Q now (the whitening probe drawn), else None."""
        pair, self._pair = self._pair, None
        if pair is None or not self._advance():
            return None
        v, h = pair
        if self._ranks is not None:  # summed over ranks: the mean of their Hessian-vector products
            h, self._ranks = h / self._ranks, None
        return (self.probe() if v is None else v), h

    def _fit_pair(self, v: Tensor, h: Tensor) -> Tensor | bool:
        """One fitting step from ``(V, H)``; returns whether it was kept (finite)."""
        if self.q_l is None:  # the first pair sets Q's scale: checked on the host, once
            if not linalg.all_finite(h):
                return torch.zeros((), dtype=torch.bool, device=self.device)  # not kept
            self._initialise(v, h)
        q_l, q_r = self._update(v, h)
        keep = linalg.finite(h, q_l, q_r)  # a rejected update leaves Q as it was
        if isinstance(keep, bool):  # read on the host: take the new factors or keep the old ones, no copy
            self._fitted(q_l if keep else self.q_l, q_r if keep else self.q_r)  # type: ignore[arg-type]
        else:
            self._fitted(torch.where(keep, q_l, self.q_l), torch.where(keep, q_r, self.q_r))  # type: ignore[arg-type]
        return keep

    def _fitted(self, q_l: Tensor, q_r: Tensor) -> None:
        """Take the factors of a fitting step (the new ones, or the old where it was rejected)."""
        self.q_l, self.q_r = q_l, q_r
        self.updates += 1
        self._dirty = True

    def _stackable(self) -> bool:
        """Fits with others of its shape: dense factors, or a vector parameter's diagonal ones, past the first pair,
        decided on an accelerator."""
        dense, vector = not (self.diag_l or self.diag_r), self.diag_l and self.diag_r and self.d_out == 1
        return self.q_l is not None and (dense or vector) and linalg.stacks_on(self.q_l.device)

    @classmethod
    def close_many(cls, pres: list[Preconditioner], output_scale: float | Tensor) -> list[Tensor | bool | None]:
        """Layers of one shape that fit this step do so as one stack (``psgd_math.fit_stacked``), each operation
        once per stack; the others one by one. Probes come from each layer's own generator, as one by one."""
        if not any(linalg.stacks_on(p.device) for p in pres):  # the CPU: one by one
            return [p.close_statistics(output_scale) for p in pres]
        results: list[Tensor | bool | None] = [None] * len(pres)
        groups: dict[tuple, list[tuple[int, tuple[Tensor, Tensor]]]] = {}
        for i, p in enumerate(pres):
            assert isinstance(p, PSGD)
            pair = p._take()
            if pair is not None and p._stackable():
                key = (p.d_out, p.d_in, p.dtype, p.device, p.lr_preconditioner, p.updates % 100 == 99, p.diag_l)
                groups.setdefault(key, []).append((i, pair))
            elif pair is not None:
                results[i] = p._fit_pair(*pair)
        for key, members in groups.items():
            group = [cast(PSGD, pres[i]) for i, _ in members]
            if len(group) < 2:
                results[members[0][0]] = group[0]._fit_pair(*members[0][1])
                continue
            v, h = (torch.stack([pair[k] for _, pair in members]) for k in (0, 1))
            ql, qr = torch.stack([p.q_l for p in group]), torch.stack([p.q_r for p in group])  # type: ignore[misc]
            lr, balance = key[4], key[5]
            fit = fit_stacked_diagonal if key[6] else fit_stacked
            new_l, new_r = fit(ql, qr, h, v, lr, group[0].tiny, balance)
            dims = (1,) if key[6] else (1, 2)  # diagonal factors are stacked vectors
            keep = linalg.is_finite(h.sum((1, 2)) + new_l.sum(dims) + new_r.sum(dims))
            kept = keep.reshape(-1, *([1] * len(dims)))
            ql, qr = torch.where(kept, new_l, ql), torch.where(kept, new_r, qr)
            for k, ((i, _), p) in enumerate(zip(members, group, strict=True)):
                p._fitted(ql[k], qr[k])
                results[i] = keep[k]
        return results

    def discard_statistics(self) -> None:
        self._pair = self._ranks = None

    def _initialise(self, v: Tensor, h: Tensor) -> None:
        """``Q = s·I`` with ``s⁴ = E[v²] / E[h²]`` (Li's automatic scale) unless ``init_scale`` is given."""
        if self.init_scale is not None:
            scale = self.init_scale
        else:
            hh = float(h.square().sum())
            scale = (float(v.square().sum()) / hh) ** 0.25 if hh > 0 else 1.0
        root = math.sqrt(scale)  # split evenly over the two factors
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.q_l = torch.full((self.d_out,), root, **kw) if self.diag_l else root * torch.eye(self.d_out, **kw)
        self.q_r = torch.full((self.d_in,), root, **kw) if self.diag_r else root * torch.eye(self.d_in, **kw)

    def _update(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """The updated ``(Q_l, Q_r)`` as new tensors (the current ones are left as they are until the update is
        known to be finite)."""
        ql, qr = self.q_l, self.q_r
        assert ql is not None and qr is not None
        if self.updates % 100 == 99:  # balance the factors' dynamic ranges (Li does this at random, 1 in 100)
            nl, nr = ql.abs().amax(), qr.abs().amax()
            g = (nl * nr).sqrt()
            ql, qr = ql * (g / nl), qr * (g / nr)
        a = right_mul(left_mul(ql, h), qr.mT if qr.dim() == 2 else qr)  # Q_l H Q_rᵀ
        b = solve_left_t(ql, v)  # Q_l⁻ᵀ V
        b = solve_right(b, qr)  # · Q_r⁻¹
        new = []
        for q, t1, t2 in (
            (ql, *criterion_terms(a, b, True, ql.dim() == 1)),
            (qr, *criterion_terms(a, b, False, qr.dim() == 1)),
        ):
            if q.dim() == 1:
                step = self.lr_preconditioner / ((t1 + t2).abs().amax() + self.tiny)
                new.append(q - step * (t1 - t2) * q)
            elif linalg.host_decides(q):  # the step size as a number: one pass fewer
                step_size = self.lr_preconditioner / (float(norm_lower_bound(t1 + t2)) + self.tiny)
                new.append(torch.sub(q, triu_matmul(t1 - t2, q), alpha=step_size))
            else:
                step = self.lr_preconditioner / (norm_lower_bound(t1 + t2) + self.tiny)
                new.append(q - step * triu_matmul(t1 - t2, q))
        return new[0], new[1]

    # -- preconditioner -----------------------------------------------------------------------------------
    def refresh(self, damping: float) -> bool | None:
        if self.q_l is None:
            return None
        if self._dirty or self.p_l is None:
            p_l, p_r = factor_gram(self.q_l), factor_gram(self.q_r)
            if not linalg.all_finite(p_l, p_r):
                return False
            self.p_l, self.p_r, self._dirty = p_l, p_r, False
        return self.refreshed()

    def precondition(self, grad: Tensor) -> Tensor:
        return right_mul(left_mul(self.p_l, grad.to(self.dtype)), self.p_r)

    def kronecker_operands(self) -> tuple[Tensor, Tensor] | None:
        """``(Q_lᵀQ_l, Q_rᵀQ_r)`` when both sides are dense: equal layers are then preconditioned as one stack on an
        accelerator (``engine.batched``)."""
        if self.p_l is None or self.p_r is None or self.p_l.dim() != 2 or self.p_r.dim() != 2:
            return None
        return self.p_l, self.p_r

    def curvature_matvec(self, v: Tensor) -> Tensor:
        """``P⁻¹ V = (Q_lᵀQ_l)⁻¹ V (Q_rᵀQ_r)⁻¹`` of the current P (SPD solves; a diagnostic, not on the hot path)."""
        x = v.to(self.dtype)
        x = x / self.p_l.unsqueeze(1) if self.p_l.dim() == 1 else torch.linalg.solve(self.p_l, x)
        return x / self.p_r if self.p_r.dim() == 1 else torch.linalg.solve(self.p_r, x.mT).mT

    def refresh_cost(self) -> float:
        return float((0 if self.diag_l else self.d_out**3) + (0 if self.diag_r else self.d_in**3)) + 1.0

    def spectrum(self) -> Tensor | None:
        """Eigenvalues of ``P⁻¹`` (the curvature P stands for)."""
        if not self.ready:
            return None
        ev = [1.0 / (p if p.dim() == 1 else torch.linalg.eigvalsh(p)) for p in (self.p_l, self.p_r)]
        return torch.outer(*ev).reshape(-1)

    # -- persistence and sharing ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        return {**super()._tensors(), "rng": self.generator.get_state()}

    def _load_tensors(self, state: dict[str, Any], derived: bool) -> None:
        super()._load_tensors(state, derived)
        if "rng" in state:
            self.generator.set_state(state["rng"].cpu())
        self._dirty = not derived  # P is formed again from the loaded Q at the next refresh

    def fit_statistic(self, name: str, saved: Tensor) -> Tensor:
        """A triangular ``Q`` saved dense keeps its diagonal when the side is now diagonal, and a diagonal one
        becomes a diagonal (triangular) matrix."""
        left = name == "q_l"
        return fit_square(name, saved, self.d_out if left else self.d_in, self.diag_l if left else self.diag_r)

    def curvature_state(self) -> list[Tensor]:
        return [t for t in (self.p_l, self.p_r) if t is not None]

    def inverse_tensors(self) -> list[Tensor]:
        shapes = [(self.d_out,) * (1 if self.diag_l else 2), (self.d_in,) * (1 if self.diag_r else 2)]
        return [self._header_tensor(), self._shareable("p_l", shapes[0]), self._shareable("p_r", shapes[1])]

    def inverse_tensors_loaded(self) -> None:
        self._read_header()
        self._dirty = False
