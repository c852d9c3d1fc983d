"""Adapters of layers taken from their gradient alone: capture has no rows for them (``hooks_refused``), so only the
methods that fit from the gradient precondition them (PSGD, Shampoo with ``statistics="gradient"``); the others
leave them plain with the reason."""

from __future__ import annotations

import math

from torch import Tensor, nn

from lightning_soo.capture.adapters import GRADIENT_METHODS, LayerAdapter, Part, UnsupportedLayerError
from lightning_soo.options import WeightSharing


class ConvTransposeAdapter(LayerAdapter):
    """``nn.ConvTranspose1d/2d/3d`` of one group (GAN generators, decoders): the weight is stored ``(in, out,
    kernel...)``; its gradient is the matrix ``(out, in · kernel)`` with the bias column. No rows capture can take:
    only methods that fit from the gradient precondition it."""

    hooks_refused = (
        f"transposed convolution: preconditioned only by methods that fit from the gradient ({GRADIENT_METHODS})"
    )

    def __init__(self, module: nn.Module, weight_sharing: WeightSharing = "expand") -> None:
        super().__init__(module, weight_sharing)
        if module.groups != 1:
            raise UnsupportedLayerError(f"transposed convolution with groups={module.groups} is not preconditioned")

    def weight_matrix(self, w: Tensor) -> Tensor:
        w = self.weight.of(w)
        return w.transpose(0, 1).reshape(w.shape[1], -1)

    def _blocks(self, m: Tensor) -> list[Tensor]:
        w = m[:, :-1] if self.bias is not None else m
        shape = self.weight.param.shape
        w = w.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
        return [w, m[:, -1]] if self.bias is not None else [w]


class ParameterAdapter(LayerAdapter):
    """A trainable parameter outside every layer capture knows (a norm's scale and shift, LoRA's bare ``lora_A``
    and ``lora_B``, a class token, a learned position table), or of a layer whose rows are refused (``why``: a
    weight computed by a parametrization, weight_norm's ``original0/1``, spectral_norm's ``original``), seen from
    its gradient alone: the matrix of its shape without size-1 dimensions, a vector as one row ``(1, d)``, a scalar
    ``(1, 1)``, three or more dimensions ``(first, rest)``. Only methods that fit from the gradient take it (PSGD, as
    Li's Kron and Distributed Shampoo precondition every parameter; Shampoo with ``statistics="gradient"``), a
    vector or scalar (``vector``) only with ``precondition_vectors``; the others leave it plain."""

    def __init__(
        self, module: nn.Module, param: nn.Parameter, weight_sharing: WeightSharing = "expand", why: str = ""
    ) -> None:
        super().__init__(module, weight_sharing, weight=Part(param))
        dims = [d for d in param.shape if d != 1]
        self.matrix: tuple[int, int] = (1, dims[0] if dims else 1) if len(dims) < 2 else (dims[0], math.prod(dims[1:]))
        self.vector = self.matrix[0] == 1
        asked = " with precondition_vectors=True" if self.vector else ""
        self.hooks_refused = f"{why or 'not in a supported module'} ({GRADIENT_METHODS} precondition it{asked})"

    def weight_matrix(self, w: Tensor) -> Tensor:
        return self.weight.of(w).reshape(self.matrix)

    def _blocks(self, m: Tensor) -> list[Tensor]:
        return [m.reshape(self.weight.param.shape)]
