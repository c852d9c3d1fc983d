"""Autograd utilities shared by the diagnostics: the loss gradient with its graph, curvature-vector products
(Hessian-vector products) on a batch, and running a side pass without leaving a trace (buffers, RNG streams).

Used by the curvature-quality measurement and by PSGD's Newton-form fit; plain PyTorch.

Curvature-vector products work on any model that can be trained (``CurvatureProducts``):

1. exact, by double backward, with ``F.scaled_dot_product_attention`` routed to its math kernel
   (``SDPBackend.MATH``): the fused CPU flash kernel and CUDA's flash / memory-efficient kernels have no double
   backward;
2. where double backward still fails (another op without a second derivative), by a central finite difference of
   two gradients, ``H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε`` with ``ε = ∛(machine ε) · (1 + ‖θ‖) / ‖v‖``: no
   double backward at all, two forward-backward passes per product. Measured against the exact product on a small
   attention model with tanh activations: relative error about 2e-5 in float32 and 5e-11 in float64
   (``tests/diagnostics/test_autograd.py``); it is wrong across ReLU kinks wherever the step crosses one, so it is
   the fallback, not the default. The first fallback is announced once through ``warn``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

WarnOnce = Callable[[str, str], None]  # (key, message): warn the first time key is seen


@contextmanager
def math_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` on its math kernel (the only one with a double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _rng_states() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


@contextmanager
def preserved_state(model: nn.Module | None) -> Iterator[None]:
    """Run on copies of the model's buffers (BatchNorm running statistics, spectral-norm vectors, ...) and restore
    the global RNG streams (CPU, and CUDA when initialised) on exit.

    The buffers are swapped for clones rather than saved and written back: the originals are never written, so
    their version counters stay put and a training graph that saved them (BatchNorm saves its running statistics
    for backward) can still be backpropagated after the pass.
    """
    rng = _rng_states()
    swapped: list[tuple[dict[str, Tensor | None], str, Tensor]] = []
    if model is not None:
        clones: dict[int, Tensor] = {}  # one clone per tensor: buffers shared between modules stay shared
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    swapped.append((module._buffers, name, buf))
                    module._buffers[name] = clones.setdefault(id(buf), buf.detach().clone())
    try:
        yield
    finally:
        for buffers, name, buf in swapped:
            buffers[name] = buf
        _set_rng_states(rng)


def _scalar_loss(loss_fn: Callable[[], Tensor]) -> Tensor:
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a scalar loss tensor, got {shape}")
    if not loss.requires_grad:
        raise RuntimeError("`loss_fn()` returned a loss without a graph (computed under torch.no_grad?)")
    return loss.reshape(())


def loss_gradients(loss_fn: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor | None, ...]:
    """``∇L`` of the managed parameters with its graph (None where a parameter does not affect the loss)."""
    return torch.autograd.grad(_scalar_loss(loss_fn), params, create_graph=True, allow_unused=True)


def hvp(grads: Sequence[Tensor | None], params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """``H · v`` by double backward: the derivative of ``⟨∇L, v⟩`` with respect to ``params``."""
    pairs = [(g, vec) for g, vec in zip(grads, vectors, strict=True) if g is not None and g.requires_grad]
    if not pairs:  # the gradient does not depend on the parameters: H = 0
        return [torch.zeros_like(p) for p in params]
    outs = torch.autograd.grad(
        [g for g, _ in pairs], params, grad_outputs=[vec for _, vec in pairs], retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(p) if o is None else o.detach() for o, p in zip(outs, params, strict=True)]


class CurvatureProducts:
    """``H · v`` on the batch ``loss_fn`` evaluates, for vectors over ``params``: exact by double backward (math
    attention kernel), else by a central finite difference of gradients (see the module docstring).

    Call it inside a side pass (``preserved_state``, capture paused). The finite difference moves the parameters'
    values in place through ``.data`` and writes the saved values back exactly (no version-counter change, so a
    live training graph is unaffected), and replays the same RNG state (dropout masks) in both evaluations.
    """

    def __init__(
        self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], warn_once: WarnOnce | None = None
    ) -> None:
        self.loss_fn, self.params, self.warn_once = loss_fn, list(params), warn_once
        self.rng = _rng_states()
        self.exact = True
        with math_attention():
            self.grads: tuple[Tensor | None, ...] | None = loss_gradients(loss_fn, self.params)

    def _fall_back(self, err: BaseException) -> None:
        self.exact, self.grads = False, None
        message = (
            f"exact Hessian-vector products are unavailable on this model ({first_line(err)}); curvature-vector "
            "products fall back to finite differences of gradients (two passes per product, about 2e-5 relative "
            "error in float32)"
        )
        if self.warn_once is not None:
            self.warn_once("finite-difference curvature products", message)
        else:
            warnings.warn(message, UserWarning, stacklevel=4)

    def __call__(self, vectors: Sequence[Tensor], span: slice | None = None) -> list[Tensor]:
        """``H v`` over every parameter, or with ``span`` the block ``H_ss v_s`` of the parameters in ``span``
        (``vectors`` then covers those parameters only)."""
        if self.exact:
            grads, params = self.grads, self.params
            if span is not None:
                grads, params = grads[span], params[span]  # type: ignore[index]
            try:
                with math_attention():
                    return hvp(grads, params, vectors)  # type: ignore[arg-type]
            except RuntimeError as err:
                self._fall_back(err)
        if span is None:
            return self._difference(vectors)
        full = [torch.zeros_like(p) for p in self.params]
        full[span] = vectors
        return self._difference(full)[span]

    def _gradient(self, params: list[Tensor]) -> list[Tensor]:
        _set_rng_states(self.rng)
        out = torch.autograd.grad(_scalar_loss(self.loss_fn), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(out, params, strict=True)]

    def _difference(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        unique = list({id(p): p for p in self.params}.values())  # a parameter may be listed once per layer using it
        total = {id(p): torch.zeros_like(p) for p in unique}
        for p, v in zip(self.params, vectors, strict=True):
            total[id(p)] += v.to(p.dtype)
        saved = [p.detach().clone() for p in unique]
        theta = torch.sqrt(sum((s.double().square().sum() for s in saved), torch.zeros((), dtype=torch.float64)))
        v_norm = torch.sqrt(
            sum((v.double().square().sum() for v in total.values()), torch.zeros((), dtype=torch.float64))
        )
        if float(v_norm) == 0.0:
            return [torch.zeros_like(p) for p in self.params]
        eps = torch.finfo(saved[0].dtype).eps ** (1 / 3) * (1.0 + float(theta)) / float(v_norm)
        grads = []
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, s in zip(unique, saved, strict=True):
                        p.data.copy_(s + (sign * eps) * total[id(p)])
                grads.append(dict(zip((id(p) for p in unique), self._gradient(unique), strict=True)))
        finally:
            with torch.no_grad():
                for p, s in zip(unique, saved, strict=True):
                    p.data.copy_(s)
        return [(grads[0][id(p)] - grads[1][id(p)]) / (2 * eps) for p in self.params]


def _norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.double().square().sum() for t in tensors), torch.zeros((), dtype=torch.float64)))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_guarded(what: str, fn: Callable[[], object], warn_once: WarnOnce) -> bool:
    """Run a diagnostic pass; a RuntimeError is reported once per ``what`` (``warn_once(key, message)``) and
    training goes on. Returns whether the pass completed."""
    try:
        fn()
    except RuntimeError as err:
        warn_once(what, f"{what} could not be made and was skipped; training goes on ({first_line(err)})")
        return False
    return True
