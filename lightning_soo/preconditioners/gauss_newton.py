"""Layer-wise Gauss-Newton (empirical Fisher) applied exactly: ``P·G = (E[g gᵀ] + ρI)⁻¹ g`` by Woodbury.

With the ``N`` per-example gradients of a layer as the columns of ``U`` (``D x N``, ``D = d_out·d_in``),
``C = UUᵀ/N + ρI`` and, with the Gram matrix ``K = UᵀU`` and ``S = K + NρI`` (``N x N``, Cholesky-factored at
refresh),

    C⁻¹ v = (v − U S⁻¹ Uᵀ v) / ρ,         C v = U Uᵀ v / N + ρ v.

Per-example gradients are never stored when each row is an example (``nn.Linear``, one row per example or per
token under weight sharing ``"expand"``; ``nn.Embedding``): the layer inputs ``H`` and output gradients ``Δ`` are
kept and ``K = (H Hᵀ) ∘ (Δ Δᵀ)`` (cost ``N²(d_in + d_out)``), ``(Uᵀ v)_n = δ_nᵀ V h_n`` and
``U w = Δᵀ diag(w) H`` (cost ``N·d_out·d_in`` each, about a weight-gradient's worth per step). For convolutions
(an example's gradient sums over its ``L`` positions) the per-example gradients are materialised by one batched
product (cost ``N·L·d_out·d_in``, memory ``N·D``), ``K = UᵀU`` costs ``N²·D`` and each step ``4·N·D``.

Damping is absolute or (``damping_mode="relative"``) relative to the largest eigenvalue of ``E[ggᵀ]``, which
makes it independent of the loss's scale. A largest eigenvalue below what the working dtype resolves
(``tiny / eps``: 9.9e-32 in float32; a layer whose gradients are zero or rounding noise) counts as no curvature:
``ρ`` is then the damping itself, as for a step of exactly zero gradients, where the relative ``ρ`` underflowed and
``1/ρ`` overflowed. No ``ρ`` is below that bound. The curvature is that of the latest statistics step (no running
average: the Woodbury form needs the examples). More than ``max_examples`` examples in a step: an evenly spaced
subset is kept (the notice says so). A module called several times per forward pass has each call's rows treated
as further examples. Rows whose output gradient is exactly zero are dropped when the step closes (the padding rule of
``capture.adapters``): they are not examples.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.capture.adapters import Count, IndexRows, Rows
from lightning_soo.options import GaussNewtonOptions
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.preconditioners.basis import Basis, DenseBasis, RowBasis, materialise


def _scaled(t: Tensor, scale: float | Tensor) -> Tensor:
    """``t · scale``; ``t`` itself for a scale of 1 (no pass)."""
    return t if isinstance(scale, (int, float)) and scale == 1.0 else t * scale


def _floating(basis: Basis) -> list[Tensor]:
    """The basis tensors whose finiteness decides whether a step is kept (not an embedding's indices)."""
    return [t for t in basis.tensors() if t.is_floating_point()]


def _owned(t: Tensor) -> Tensor:
    """``t``, copied when it is a view (of the layer's input: the caller may overwrite it before the next refresh)."""
    return t.clone() if t._base is not None else t


class GaussNewton(Preconditioner):
    """Exact damped inverse of one layer's empirical Fisher, by Woodbury over the examples of a step."""

    options_type = GaussNewtonOptions
    options: GaussNewtonOptions
    state_numbers = ("damping",)
    derived = ("damping",)  # and the Cholesky factor (``_load_tensors``)
    config_keys = ("damping_mode", "max_examples")
    running_statistics = False  # the latest statistics step is the curvature

    def build(self) -> None:
        self.max_examples = self.options.max_examples
        self.relative = self.options.damping_mode == "relative"
        self._chunks: list[tuple[Rows, Tensor, int, float]] = []  # (H, Δ, examples, Δ's scale) of this step
        self._pending: list[Tensor] | None = None  # the step's basis (all ranks'): [U] or [H or one-hot index, Δ]
        self.latest: Basis | None = None  # basis of the last statistics step
        self._unsettled: tuple[Basis | None, Tensor | bool] | None = None  # (basis before it, is it finite?)
        self.basis: Basis | None = None  # basis of the current preconditioner
        self.chol: Tensor | None = None  # Cholesky factor of K + NρI
        self._rho: tuple[Tensor, Tensor] | None = None  # (the factor it belongs to, ρ as a device tensor)
        self.damping = 0.0
        info = torch.finfo(self.dtype)
        self.resolution = info.tiny / info.eps  # the smallest curvature (and ρ) the dtype resolves

    # -- statistics -------------------------------------------------------------------------------------
    def observe_inputs(self, rows: Rows, count: Count) -> Rows:
        return rows

    def observe_output_grads(self, rows: Tensor, n_examples: Count, ctx: Any, scale: float | Tensor = 1.0) -> None:
        per_row = not isinstance(n_examples, int) or rows.shape[0] == n_examples  # a tensor: token rows
        self._chunks.append((ctx, rows, rows.shape[0] if per_row else n_examples, scale))  # Δ scaled when packed

    def _pack(self) -> list[Tensor] | None:
        """This step's chunks as basis tensors: ``[H or index, Δ]`` when every row is an example, else ``[U]``."""
        chunks = self._chunks
        if self._pending is None and chunks:
            if any(d.shape[0] != n for _, d, n, _ in chunks):  # an example spans several rows
                self._pending = [torch.cat([materialise(h, _scaled(d, s), n) for h, d, n, s in chunks])]
            else:
                hs = [h.index if isinstance(h, IndexRows) else h for h, _, _, _ in chunks]
                ds = [_scaled(d, s) for _, d, _, s in chunks]
                # one call (the usual case): its rows as they are, no copy unless they are a view of the input
                self._pending = [_owned(hs[0]), ds[0]] if len(chunks) == 1 else [torch.cat(hs), torch.cat(ds)]
            chunks.clear()
        return self._pending

    def gather_tensors(self) -> list[Tensor] | None:
        """This rank's basis; without rows (an expert no token was routed to here) ``[H, Δ]`` of none, the form of
        a linear layer's rows (each an example), which the other ranks' rows of such a layer take too."""
        empty = torch.empty((0, self.d_in), dtype=self.dtype, device=self.device)
        return self._pack() or [empty, torch.empty((0, self.d_out), dtype=self.dtype, device=self.device)]

    def gathered(self, tensors: list[Tensor]) -> None:
        self._pending = tensors

    def close_statistics(self, output_scale: float | Tensor) -> Tensor | bool | None:
        basis = self._closing_basis(output_scale)
        if basis is None:
            return None
        return self._adopt(basis, linalg.finite(*_floating(basis)))

    @classmethod
    def close_many(cls, pres: list[Preconditioner], output_scale: float | Tensor) -> list[Tensor | bool | None]:
        """Where the device decides, every layer's finiteness check in one ``foreach`` norm and one reduction
        (on an accelerator a handful of launches per step instead of five per layer); else one by one."""
        if linalg.HOST_DECIDES_ON_CPU and all(p.device.type == "cpu" for p in pres):  # one by one, flags read
            return [p.close_statistics(output_scale) for p in pres]
        bases = [cast(GaussNewton, p)._closing_basis(output_scale) for p in pres]
        found = [(p, b) for p, b in zip(pres, bases, strict=True) if b is not None]
        tensors = [_floating(b) for _, b in found]
        width, dtype = (len(tensors[0]), tensors[0][0].dtype) if tensors else (0, None)
        alike = all(len(ts) == width and all(t.dtype == dtype for t in ts) for ts in tensors)
        if len(found) < 2 or not alike or linalg.host_decides(tensors[0][0]):
            keeps: list[Tensor | bool] = [linalg.finite(*ts) for ts in tensors]
        else:  # NaN and Inf propagate into the norms (a finite tensor whose norm overflows counts as not finite)
            norms = torch.stack(torch._foreach_norm([t for ts in tensors for t in ts], 1))
            keeps = list(linalg.is_finite(norms.reshape(-1, width).sum(1)).unbind())
        flags = iter(keeps)
        return [
            None if b is None else cast(GaussNewton, p)._adopt(b, next(flags)) for p, b in zip(pres, bases, strict=True)
        ]

    def _closing_basis(self, output_scale: float | Tensor) -> Basis | None:
        """This step's basis (the output gradients scaled to per-example ones), or None without rows."""
        pending = self._pack()
        self._pending = None
        if not pending or pending[-1].shape[0] == 0:
            return None
        if len(pending) == 1:
            return DenseBasis(_scaled(pending[0], output_scale))  # the kept rows are linear in it
        h = pending[0] if pending[0].is_floating_point() else IndexRows(pending[0], self.d_in)
        return RowBasis(h, _scaled(pending[1], output_scale))

    def _adopt(self, basis: Basis, keep: Tensor | bool) -> Tensor | bool:
        """Take ``basis`` as the latest, the last settled one kept until ``keep`` (finite) is known."""
        if self._unsettled is None:
            self._unsettled = (self.latest, keep)  # the last settled basis, kept until the new one is known finite
        self.latest = basis
        return keep

    def _settle(self) -> None:
        """At refresh (where reading the device is allowed): back to the last finite basis if this step's was not;
        else drop the rows that are not examples (the padding rule: a zero output gradient) and keep at most
        ``max_examples`` (evenly spaced, with a notice)."""
        if self._unsettled is None:
            return
        previous, keep = self._unsettled
        self._unsettled = None
        if not bool(keep):
            self.latest = previous
            return
        basis = self.latest
        if isinstance(basis, RowBasis):
            real = (basis.d != 0).any(1)
            if not bool(real.all()):
                basis = basis.select(real.nonzero().squeeze(1))
        if basis is not None and basis.n > self.max_examples:
            self.notice = (
                f"{basis.n} examples in one step exceed `max_examples`={self.max_examples} of the N x N solve; "
                f"an evenly spaced subset of {self.max_examples} is used (raise `max_examples` for the exact curvature)"
            )
            basis = basis.select(torch.linspace(0, basis.n - 1, self.max_examples, device=self.device).round().long())
        self.latest = basis if basis is None or basis.n > 0 else previous

    def discard_statistics(self) -> None:
        self._chunks.clear()
        self._pending = None

    # -- preconditioner -----------------------------------------------------------------------------------
    def refresh(self, damping: float) -> bool | None:
        return self.refresh_many([self], damping)[0]

    @classmethod
    def refresh_many(cls, pres: list[Preconditioner], damping: float) -> list[bool | None]:
        """Every layer's Cholesky factor of ``K + NρI``, with the relative damping's scales and the factorisations
        batched over layers with equally many examples (on accelerators: every layer of a step usually has N)."""
        todo = [p for p in pres if isinstance(p, GaussNewton) and p._settled_basis() is not None]
        done: dict[int, bool] = {}
        if damping > 0:  # else (E[ggᵀ] + 0·I) is singular beyond the N examples: every refresh fails
            grams = [p.latest.gram() for p in todo]  # type: ignore[union-attr]
            rhos = [float(damping)] * len(todo)
            relative = [i for i, p in enumerate(todo) if p.relative]
            tops = linalg.largest_eigenvalue_many([grams[i] for i in relative])
            for i, top in zip(relative, tops, strict=True):  # relative to λ_max of E[ggᵀ], that of K / N
                scale = top / todo[i].latest.n  # type: ignore[union-attr]
                rhos[i] = damping * scale if scale > todo[i].resolution else damping  # below: no curvature
            rhos = [max(rho, p.resolution) for p, rho in zip(todo, rhos, strict=True)]  # 1/ρ stays finite
            for p, s, rho in zip(todo, grams, rhos, strict=True):
                s.diagonal().add_(p.latest.n * rho)  # type: ignore[union-attr]
            for p, chol, rho in zip(todo, linalg.cholesky_many(grams), rhos, strict=True):
                if chol is not None:
                    p.basis, p.chol = p.latest, chol
                    p.damping = p.applied_damping = rho
                done[id(p)] = chol is not None and p.refreshed()
        refreshed = {id(p) for p in todo}  # layers without a basis yet: None
        return [done.get(id(p), False) if id(p) in refreshed else None for p in pres]

    def _settled_basis(self) -> Basis | None:
        self._settle()
        return self.latest

    def precondition(self, grad: Tensor) -> Tensor:
        g = grad.to(self.dtype)
        return self.basis.remove(g, self._solve(self.basis.project(g)), self.damping)

    def stack_operands(self) -> tuple[Tensor, ...] | None:
        """``(H, Δ, chol, ρ)`` when every row is an example with dense inputs (``nn.Linear``): layers with equally
        many examples are then preconditioned as one stack on an accelerator (``engine.batched``)."""
        basis = self.basis
        if not isinstance(basis, RowBasis) or isinstance(basis.h, IndexRows) or self.chol is None:
            return None
        if self._rho is None or self._rho[0] is not self.chol:  # one tensor per refresh: the stacks' cache key
            self._rho = (self.chol, torch.tensor(self.damping, dtype=self.dtype).to(self.device, non_blocking=True))
        return basis.h, basis.d, self.chol, self._rho[1]

    @classmethod
    def precondition_stacked(cls, operands: tuple[Tensor, ...], g: Tensor) -> Tensor:
        """``(G − U S⁻¹ Uᵀ G) / ρ`` of every member: ``precondition`` with each operation once per stack."""
        h, d, chol, rho = operands
        c = (d @ g).mul_(h).sum(2) if h.shape[2] <= d.shape[2] else (h @ g.mT).mul_(d).sum(2)  # Uᵀ vec(G) per member
        y = torch.linalg.solve_triangular(chol, c.unsqueeze(2), upper=False)
        w = torch.linalg.solve_triangular(chol.mT, y, upper=True)  # (K + NρI)⁻¹ Uᵀ G
        return torch.baddbmm(g, (d * w).mT, h, alpha=-1.0).div_(rho.reshape(-1, 1, 1))

    def _solve(self, c: Tensor) -> Tensor:
        """``(K + NρI)⁻¹ c`` by two triangular solves with the Cholesky factor: ``cholesky_solve`` copies the
        factor first, which at N = 2048 made it 2.0 ms against 0.74 (one thread)."""
        chol = self.chol
        assert chol is not None
        y = torch.linalg.solve_triangular(chol, c.unsqueeze(1), upper=False)
        return torch.linalg.solve_triangular(chol.mT, y, upper=True).squeeze(1)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        return self.basis.combine(self.basis.project(v), v.shape) / self.basis.n + self.damping * v

    def refresh_cost(self) -> float:
        self._settle()
        n = self.latest.n if self.latest is not None else self.max_examples
        return float(n**3) + 1.0

    def spectrum(self) -> Tensor | None:
        """The ``N`` eigenvalues of ``C`` within the span of the examples (the rest are ``ρ``)."""
        if not self.ready:
            return None
        if self._spectrum is None:
            k = self.chol @ self.chol.mT
            self._spectrum = (torch.linalg.eigvalsh(k) / self.basis.n).clamp(min=self.damping)
        return self._spectrum

    def curvature_state(self) -> list[Tensor]:
        """The spectrum: the Gram matrices of two steps are of different examples, so only their eigenvalues
        compare (computed once per refresh, shared with the dashboard)."""
        spectrum = self.spectrum()
        return [] if spectrum is None else [spectrum]

    # -- persistence and sharing ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        self._settle()
        if self.basis is None:
            return {}
        names = ["u"] if isinstance(self.basis, DenseBasis) else ["h", "d"]
        out = dict(zip(names, self.basis.tensors(), strict=True))
        out["chol"] = self.chol
        return out

    def _load_tensors(self, state: dict[str, Any], derived: bool) -> None:
        self.basis = self.latest = self.chol = None
        if "chol" not in state:
            return
        cast = {"device": self.device, "dtype": self.dtype, "copy": True}  # never alias the caller's state
        if "u" in state:
            self._check("u", state["u"], 1, (self.d_out, self.d_in))
            self.basis = DenseBasis(state["u"].to(**cast))
        else:
            h, d = state["h"], state["d"]
            if h.is_floating_point():
                self._check("h", h, 1, (self.d_in,))
            self._check("d", d, 1, (self.d_out,))
            h = IndexRows(h.to(self.device, copy=True), self.d_in) if not h.is_floating_point() else h.to(**cast)
            self.basis = RowBasis(h, d.to(**cast))
        self.latest = self.basis
        self.chol = state["chol"].to(**cast) if derived else None

    @staticmethod
    def _check(name: str, saved: Tensor, start: int, shape: tuple[int, ...]) -> None:
        if tuple(saved.shape[start:]) != shape:
            raise ValueError(
                f"saved `{name}` has shape {tuple(saved.shape)}, this layer needs (N, {', '.join(map(str, shape))})"
            )

    def inverse_tensors(self) -> list[Tensor]:
        """The Cholesky factor of the latest basis (same on every rank after the gather), or zeros."""
        self._settle()
        n = self.latest.n if self.latest is not None else 0
        adopted = self.basis is self.latest and self.chol is not None and self.chol.shape[0] == n
        # the other ranks read ρ from the header, rounded to the dtype: use that value here too (``remove`` divides
        # by it in double), so that every rank computes the same P·G bit for bit
        self.damping = float(torch.tensor(self.damping, dtype=self.dtype))
        header = self._header_tensor(float(adopted), self.damping)
        self._shared = self.chol.contiguous() if adopted else torch.zeros(n, n, dtype=self.dtype, device=self.device)
        return [header, self._shared]

    def inverse_tensors_loaded(self) -> None:
        adopted, damping = self._read_header()
        if adopted > 0.5 and self.latest is not None:
            self.basis, self.chol = self.latest, self._shared
            self.damping = self.applied_damping = damping
            self._spectrum = None
        self.ready = self.ready and self.chol is not None
