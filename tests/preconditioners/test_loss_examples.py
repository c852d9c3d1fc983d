"""The output-gradient statistics average the loss's examples, not each layer's rows (``engine.examples``):
K-FAC-expand's ``B = (1/N) Σ_rows b bᵀ`` with ``b = N·δ`` and ``N`` the count of the layer nearest the loss, for
token layers of an image classifier, an encoder read by a decoder's loss, a layer called twice, and accumulation.
Checked in float64 against the definition built from the captured outputs' gradients; a 1x1 convolution and the
same permute-then-``Linear`` get one update (they did not when each layer counted its own rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

pytestmark = pytest.mark.usefixtures("float64")


class ImageTokens(nn.Module):
    """Tokens per image through a shared ``Linear`` (called twice), pooled, then a head on one row per image."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, tokens, 3)
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))
        return self.head(h.mean(1))


class EncoderDecoder(nn.Module):
    """An encoder over source tokens, pooled into each target token; the loss is over target tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 7)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        context = torch.tanh(self.enc(src)).mean(1, keepdim=True)
        return self.head(torch.tanh(self.dec(tgt) + context))


def _capture(model: nn.Module) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """Each ``Linear``'s input rows (with the bias column) and outputs (kept for their gradients), per call."""
    inputs: dict[str, list[Tensor]] = {}
    outputs: dict[str, list[Tensor]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):

            def hook(m: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                inputs.setdefault(name, []).append(torch.cat([x, x.new_ones(x.shape[0], 1)], 1).detach())
                out.retain_grad()
                outputs.setdefault(name, []).append(out)

            mod.register_forward_hook(hook)
    return inputs, outputs


def _check_definition(model: nn.Module, loss_of: list, n: list[int]) -> None:
    """K-FAC's A and B after one step of ``len(loss_of)`` accumulated micro-batches (each loss a mean over its
    ``n[i]`` examples) equal their definitions: A the mean of the input rows, B ``(1/ΣN) Σ_rows (N_i k δ)(N_i k δ)ᵀ``
    (``k δ``: the gradient of the micro-batch's own mean loss)."""
    reference = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    manager = PreconditionerManager(model, "kfac", factor_decay=0.0, kl_clip=None, damping=0.1, warn=lambda m: None)
    inputs, outputs = _capture(model)
    k = len(loss_of)
    manager.begin_step()
    grads: dict[str, list[Tensor]] = {}
    for i, loss in enumerate(loss_of):
        outputs.clear()
        (loss(model) / k).backward()
        for name, outs in outputs.items():
            grads.setdefault(name, []).extend(o.grad.reshape(-1, o.shape[-1]) * (n[i] * k) for o in outs)
    manager.step(accumulation=k)
    for name in reference:
        h = torch.cat(inputs[name])
        b = torch.cat(grads[name])
        pre = manager.layers[name].preconditioner
        torch.testing.assert_close(pre.a, h.T @ h / h.shape[0], rtol=1e-10, atol=1e-13, msg=f"A of {name}")
        torch.testing.assert_close(pre.b, b.T @ b / sum(n), rtol=1e-10, atol=1e-13, msg=f"B of {name}")


def test_token_layers_of_an_image_classifier_average_the_images() -> None:
    """``N`` is the batch (the head's rows), for the token layers (5 rows per image) and the layer called twice."""
    torch.manual_seed(0)
    model = ImageTokens()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (4,))
    _check_definition(model, [lambda m: F.cross_entropy(m(x), y)], [4])


def test_an_encoder_averages_the_target_tokens() -> None:
    """The encoder's rows are 4 x 7 source tokens; the loss's examples the 4 x 2 target tokens."""
    torch.manual_seed(0)
    model = EncoderDecoder()
    src, tgt, y = torch.randn(4, 7, 3), torch.randn(4, 2, 3), torch.randint(0, 7, (4, 2))
    _check_definition(model, [lambda m: F.cross_entropy(m(src, tgt).reshape(-1, 7), y.reshape(-1))], [8])


def test_accumulated_micro_batches_each_count_their_own_examples() -> None:
    """Two micro-batches of 3 and 5 images: each pass's ``N`` is its own head's count."""
    torch.manual_seed(0)
    model = ImageTokens()
    xs, ys = [torch.randn(3, 5, 3), torch.randn(5, 5, 3)], [torch.randint(0, 4, (3,)), torch.randint(0, 4, (5,))]
    losses = [lambda m, x=x, y=y: F.cross_entropy(m(x), y) for x, y in zip(xs, ys, strict=True)]
    _check_definition(model, losses, [3, 5])


def test_a_model_called_twice_on_one_loss_counts_both_calls() -> None:
    """A siamese pass: the model (head included) runs on two batches of 4 and one loss averages all 8; every layer's
    statistics folded before the head's second call arrived are completed by the close's ratio."""
    torch.manual_seed(0)
    model = ImageTokens()
    x1, x2, y = torch.randn(4, 5, 3), torch.randn(4, 5, 3), torch.randint(0, 4, (8,))
    _check_definition(model, [lambda m: F.cross_entropy(torch.cat([m(x1), m(x2)]), y)], [8])


def test_a_recomputed_forward_does_not_start_a_pass() -> None:
    """Activation checkpointing runs the middle layers' forward again inside the backward pass: ``N`` stays the
    head's."""
    torch.manual_seed(0)
    model = ImageTokens()
    mid = model.mid

    def forward(x: Tensor) -> Tensor:
        h = torch.tanh(model.inp(x))
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(mid(torch.tanh(mid(t)))), h, use_reentrant=False)
        return model.head(h.mean(1))

    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (4,))
    managed = PreconditionerManager(model, "kfac", factor_decay=0.0, kl_clip=None, warn=lambda m: None)
    managed.begin_step()
    F.cross_entropy(forward(x), y).backward()
    managed.step()
    plain = ImageTokens()
    plain.load_state_dict(model.state_dict())
    reference = PreconditionerManager(plain, "kfac", factor_decay=0.0, kl_clip=None, warn=lambda m: None)
    reference.begin_step()
    F.cross_entropy(plain(x), y).backward()
    reference.step()
    for name in ("inp", "mid", "head"):
        got, want = managed.layers[name].preconditioner, reference.layers[name].preconditioner
        torch.testing.assert_close(got.b, want.b, rtol=1e-10, atol=1e-13)


class ConvNet(nn.Module):
    """A 1x1 convolution over a feature map, pooled, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = nn.Conv2d(3, 6, 1), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(x)).mean((2, 3)))


class LinearNet(nn.Module):
    """The same model with the 1x1 convolution written as a ``Linear`` on channels-last positions (ConvNeXt)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = nn.Linear(3, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(x.permute(0, 2, 3, 1))).mean((1, 2)))


OPTIONS = [
    ("kfac", {"damping": 1e-2}),
    ("shampoo", {"grafting": None}),
    ("shampoo", {"grafting": None, "damping_mode": "absolute", "damping": 1e-3}),
]


@pytest.mark.parametrize("method,options", OPTIONS)
def test_a_1x1_convolution_and_the_same_linear_get_one_update(method: str, options: dict) -> None:
    torch.manual_seed(0)
    conv, lin = ConvNet(), LinearNet()
    with torch.no_grad():
        lin.mix.weight.copy_(conv.mix.weight.reshape(6, 3))
        lin.mix.bias.copy_(conv.mix.bias)
        lin.head.load_state_dict(conv.head.state_dict())
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 4, (4,))
    grads = []
    for model in (conv, lin):
        manager = PreconditionerManager(model, method, kl_clip=None, warn=lambda m: None, **options)
        for _ in range(2):  # a refresh at the first step, its preconditioner applied at the second
            model.zero_grad()
            manager.begin_step()
            F.cross_entropy(model(x), y).backward()
            manager.step()
        grads.append({n: p.grad.reshape(p.shape[0], -1) for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
