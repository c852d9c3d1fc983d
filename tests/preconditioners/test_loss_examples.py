"""The output-gradient statistics of a layer with fewer rows than the loss has examples average the loss's examples
(``engine.examples``): ``B = (1/N) Σ_rows b bᵀ`` with ``b = N·δ`` and ``N`` the count of the layer nearest the loss,
for mixture-of-experts-like experts (each sees part of the tokens), an encoder shorter than its target, a head
called twice on one loss, and accumulation; a layer with more rows than the head (the tokens of an image) keeps its
own rows. Checked in float64 against the definitions built from the captured outputs' gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, linalg

pytestmark = pytest.mark.usefixtures("float64")


class Routed(nn.Module):
    """Tokens through one of two experts by a fixed route (the first ``cut`` tokens of each sequence to ``a``), then
    a head on every token: each expert's rows are a part of the loss's examples."""

    def __init__(self, cut: int = 2) -> None:
        super().__init__()
        self.cut = cut
        self.inp, self.a, self.b, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, tokens, 3) -> (batch, tokens, 4)
        h = torch.tanh(self.inp(x))
        c = self.cut  # an expert without tokens is not called (as a mixture-of-experts loop skips it)
        parts = [torch.tanh(e(p)) for e, p in ((self.a, h[:, :c]), (self.b, h[:, c:])) if p.shape[1]]
        return self.head(torch.cat(parts, 1))


class EncoderDecoder(nn.Module):
    """An encoder over source tokens, pooled into each target token; the loss is over target tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 7)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        context = torch.tanh(self.enc(src)).mean(1, keepdim=True)
        return self.head(torch.tanh(self.dec(tgt) + context))


class ImageTokens(nn.Module):
    """Tokens per image through a ``Linear``, pooled, then a head on one row per image."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(3, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, tokens, 3)
        return self.head(torch.tanh(self.inp(x)).mean(1))


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


def _check_definition(model: nn.Module, loss_of: list, n: list[int], own: frozenset[str] = frozenset()) -> None:
    """K-FAC's A and B after one step of ``len(loss_of)`` accumulated micro-batches (each loss a mean over its
    ``n[i]`` examples) equal their definitions: A the mean of the input rows, B ``(1/ΣN) Σ_rows (N_i k δ)(N_i k δ)ᵀ``
    (``k δ``: the gradient of the micro-batch's own mean loss); a layer in ``own`` (one micro-batch) counts its rows
    instead: ``(1/rows) Σ_rows (rows·δ)(rows·δ)ᵀ``."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    manager = PreconditionerManager(model, "kfac", factor_decay=0.0, kl_clip=None, damping=0.1, warn=lambda m: None)
    inputs, outputs = _capture(model)
    k = len(loss_of)
    manager.begin_step()
    grads: dict[str, list[tuple[Tensor, int]]] = {}  # each call's output gradients (k δ) and its pass's N
    for i, loss in enumerate(loss_of):
        outputs.clear()
        (loss(model) / k).backward()
        for name, outs in outputs.items():
            grads.setdefault(name, []).extend((o.grad.reshape(-1, o.shape[-1]) * k, n[i]) for o in outs)
    manager.step(accumulation=k)
    for name in names:
        h, d = torch.cat(inputs[name]), torch.cat([g for g, _ in grads[name]])
        pre = manager.layers[name].preconditioner
        torch.testing.assert_close(pre.a, h.T @ h / h.shape[0], rtol=1e-10, atol=1e-13, msg=f"A of {name}")
        if name in own:
            b, count = d * d.shape[0], d.shape[0]
        else:  # each micro-batch's rows times its N
            b, count = torch.cat([g * m for g, m in grads[name]]), sum(n)
        torch.testing.assert_close(pre.b, b.T @ b / count, rtol=1e-10, atol=1e-13, msg=f"B of {name}")


def test_experts_average_every_token_and_image_tokens_their_rows() -> None:
    """Two experts on 2 and 3 of 5 tokens per sequence: ``N`` = the head's 4 x 5 tokens; the layer before them and
    the head have as many rows as the head (unchanged)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (4, 5))
    _check_definition(Routed(), [lambda m: F.cross_entropy(m(x).reshape(-1, 4), y.reshape(-1))], [20])


def test_token_layers_of_an_image_classifier_keep_their_rows() -> None:
    """5 tokens per image, one head row per image: the token layer has more rows than the head."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (4,))
    _check_definition(ImageTokens(), [lambda m: F.cross_entropy(m(x), y)], [4], own=frozenset({"inp"}))


@pytest.mark.parametrize("source", [2, 7])
def test_an_encoder_shorter_than_its_target_averages_the_target_tokens(source: int) -> None:
    """The loss's examples are the 4 x 3 target tokens; an encoder over 4 x 2 source tokens takes them, one over
    4 x 7 keeps its rows."""
    torch.manual_seed(0)
    src, tgt, y = torch.randn(4, source, 3), torch.randn(4, 3, 3), torch.randint(0, 7, (4, 3))
    own = frozenset({"enc"}) if source > 3 else frozenset()
    _check_definition(
        EncoderDecoder(), [lambda m: F.cross_entropy(m(src, tgt).reshape(-1, 7), y.reshape(-1))], [12], own
    )


def test_accumulated_micro_batches_each_count_their_own_examples() -> None:
    """Two micro-batches of 3 and 5 sequences: each pass's ``N`` is its own head's count."""
    torch.manual_seed(0)
    model = Routed()
    xs, ys = [torch.randn(3, 5, 3), torch.randn(5, 5, 3)], [torch.randint(0, 4, (3, 5)), torch.randint(0, 4, (5, 5))]
    losses = [
        lambda m, x=x, y=y: F.cross_entropy(m(x).reshape(-1, 4), y.reshape(-1)) for x, y in zip(xs, ys, strict=True)
    ]
    _check_definition(model, losses, [15, 25])


def test_a_model_called_twice_on_one_loss_counts_both_calls() -> None:
    """A siamese pass: the model (head included) runs on two batches of 4 x 5 tokens and one loss averages all 40;
    the statistics folded before the head's second call arrived are completed by the close's ratio."""
    torch.manual_seed(0)
    x1, x2, y = torch.randn(4, 5, 3), torch.randn(4, 5, 3), torch.randint(0, 4, (40,))
    _check_definition(Routed(), [lambda m: F.cross_entropy(torch.cat([m(x1), m(x2)]).reshape(-1, 4), y)], [40])


def test_a_recomputed_forward_does_not_start_a_pass() -> None:
    """Activation checkpointing runs the experts' forward again inside the backward pass: ``N`` stays the head's."""
    torch.manual_seed(0)
    model = Routed()

    def forward(x: Tensor) -> Tensor:
        h = torch.tanh(model.inp(x))
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.cat([torch.tanh(model.a(t[:, :2])), torch.tanh(model.b(t[:, 2:]))], 1),
            h,
            use_reentrant=False,
        )
        return model.head(h)

    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (20,))
    managed = PreconditionerManager(model, "kfac", factor_decay=0.0, kl_clip=None, warn=lambda m: None)
    managed.begin_step()
    F.cross_entropy(forward(x).reshape(-1, 4), y).backward()
    managed.step()
    plain = Routed()
    plain.load_state_dict(model.state_dict())
    reference = PreconditionerManager(plain, "kfac", factor_decay=0.0, kl_clip=None, warn=lambda m: None)
    reference.begin_step()
    F.cross_entropy(plain(x).reshape(-1, 4), y).backward()
    reference.step()
    for name in ("inp", "a", "b", "head"):
        got, want = managed.layers[name].preconditioner, reference.layers[name].preconditioner
        torch.testing.assert_close(got.b, want.b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_experts_match_one_layer_on_the_same_rows(method: str) -> None:
    """An expert's preconditioned gradient is that of the same layer in a model where it sees every token but the
    others' output gradients are zero (the empirical Fisher's zeros for the tokens it never saw): equal to 1e-9."""
    torch.manual_seed(0)
    routed = Routed()

    class Masked(Routed):
        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.inp(x))
            keep = torch.zeros(1, x.shape[1], 1, dtype=x.dtype)
            keep[:, : self.cut] = 1.0
            a, b = torch.tanh(self.a(h)) * keep, torch.tanh(self.b(h[:, self.cut :]))
            return self.head(torch.cat([a[:, : self.cut], b], 1) + a * 0.0 * (1 - keep))

    masked = Masked()
    masked.load_state_dict(routed.state_dict())
    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (20,))
    grads = []
    for model in (routed, masked):
        manager = PreconditionerManager(model, method, kl_clip=None, grafting=None, warn=lambda m: None)
        for _ in range(2):
            model.zero_grad()
            manager.begin_step()
            F.cross_entropy(model(x).reshape(-1, 4), y).backward()
            manager.step()
        grads.append(model.a.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


class Discriminator(nn.Module):
    """A convolution over 4x4 maps, pooled, then a one-logit head: called on real and fake images in one loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def test_a_discriminator_on_real_and_fake_counts_both_batches() -> None:
    """A GAN discriminator's step: one loss over 3 real and 3 fake images. The convolution's examples are the batch:
    its B is ``(1/6) Σ_positions (6δ)(6δ)ᵀ`` over both calls' positions (it was a quarter of that)."""
    torch.manual_seed(0)
    model = Discriminator()
    real, fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    outs: list[Tensor] = []

    def keep(m: nn.Module, args: tuple, out: Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    model.conv.register_forward_hook(keep)
    manager = PreconditionerManager(model, "kfac", factor_decay=0.0, kl_clip=None, warn=lambda m: None)
    manager.begin_step()
    logits = torch.cat([model(real), model(fake)])
    F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(3, 1), torch.zeros(3, 1)])).backward()
    manager.step()
    d = torch.cat([o.grad.permute(0, 2, 3, 1).reshape(-1, 3) for o in outs]) * 6
    torch.testing.assert_close(manager.layers["conv"].preconditioner.b, d.T @ d / 6, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device-path"])
def test_an_expert_missing_from_a_micro_batch_averages_every_example(
    host: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accumulation of two micro-batches where expert ``a`` gets no token in the second (not called there): its B
    still averages the step's every example, ``(1/ΣN) Σ_rows`` (before: only the ``N`` of the micro-batch it was
    called in, B twice too large here); ``b``, called in both, and ``a``'s A are unchanged. On the CPU's path and the
    accelerator's (counts as tensors, a mean loss's count squared at the close)."""
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    torch.manual_seed(0)
    x1, y1, x2, y2 = (
        torch.randn(4, 5, 3),
        torch.randint(0, 4, (4, 5)),
        torch.randn(4, 5, 3),
        torch.randint(0, 4, (4, 5)),
    )

    def first(m: Routed) -> Tensor:
        m.cut = 2
        return F.cross_entropy(m(x1).reshape(-1, 4), y1.reshape(-1))

    def second(m: Routed) -> Tensor:
        m.cut = 0  # every token to ``b``
        return F.cross_entropy(m(x2).reshape(-1, 4), y2.reshape(-1))

    _check_definition(Routed(), [first, second], [20, 20])
