"""The loss's number of examples ``N`` in a backward pass, read off the layer nearest the loss.

A mean loss's ``1/N`` is undone in the output-gradient statistics, and K-FAC-expand's output side is
``B = (1/N) Σ_rows b bᵀ`` over every row of a layer with ``b = N·δ`` the per-example loss's gradient: its ``N`` is
the loss's, not the layer's row count. They differ wherever a layer's rows are not the loss's examples: the token
layers of an image classifier (ViT, ConvNeXt, MLP-Mixer: ``T`` rows per image, the head one), an
encoder-decoder's encoder (source tokens; the loss counts target tokens), a mixture-of-experts layer's experts
(their routed rows), a layer called ``k`` times in one forward pass. Counting rows there makes ``B`` a factor
rows/``N`` off, and K-FAC's damping and update size per layer with it (a 1x1 convolution and the same
permute-then-``Linear`` got different updates).

The layer nearest the loss is the one whose output gradient autograd computes first after the forward pass: a
classifier's head (one row per image), a language model's head (one row per token; rows whose output gradient is
exactly zero are not examples, so a loss over some tokens only counts those). Its count (``Observation.n``, the
adapter's number of examples: the batch for a convolution) is ``N`` for every layer of that backward pass: each
layer's output-gradient rows are multiplied by it and its statistic's divisor takes it once per pass, however many
calls and rows the layer has. The head itself is unchanged, and so is every layer whose count equals the head's.
Where the head is called again in the pass (one loss over two calls' examples), the statistics are multiplied by
the ratio of all its calls' count to the first's when they close (``ratio``): every layer's statistics folded
before those calls arrived took the first's alone.

A recomputed forward inside the backward pass (activation checkpointing) does not start a new pass. A first call
whose count the host knows to be zero (every output-gradient row exactly zero: a branch multiplied by zero) is not the
head; on an accelerator, where the padding rule's count stays on the device, it would be, and that pass would fold no
statistics (the next pass's would).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_soo.capture.rows import Count, RowCount, count_tensor
from lightning_soo.linalg import host_decides


class LossExamples:
    """The current backward pass's ``N``, a pass number that tells a layer's first call in it from the others, and
    the head's further calls in a pass (a siamese or contrastive model, a GAN discriminator on real and fake images:
    one loss over both calls' examples), whose counts the close adds to ``N`` (``ratio``)."""

    __slots__ = ("_closed", "_first", "_head", "_repeated", "_total", "count", "fresh", "passes")

    def __init__(self) -> None:
        self.fresh = True  # a forward pass ran since the last output gradient: the next one is the head's
        self.count: Count = 0
        self.passes = 0
        self._head: object = None  # the use whose call set ``N``
        self._first: Count = 0  # the sum of the passes' ``N`` since the statistics last closed
        self._total: Count = 0  # the same with the head's further calls
        self._repeated = False
        self._closed = False

    def forward_call(self) -> None:
        """A managed call in a forward pass (not a recomputation inside a backward pass)."""
        if not self.fresh and torch._C._current_graph_task_id() == -1:
            self.fresh = True

    def arrive(self, n: Count, use: object) -> Count:
        """An output gradient of a call of ``use`` (a layer's use) with ``n`` examples arrived: the first after a
        forward pass sets ``N``, unless the host knows it has none (a branch the loss multiplies by zero); a further
        call of the same use in the pass adds to the close's count. Returns ``N`` (``n`` for a call without any)."""
        if self.fresh:
            if _none_on_host(n):
                return n
            if self._closed:
                self._first, self._total, self._repeated, self._closed = 0, 0, False, False
            self.fresh, self.count, self._head = False, n, use
            self.passes += 1
            self._first, self._total = _plus(self._first, n), _plus(self._total, n)
        elif use is self._head:
            self._total, self._repeated = _plus(self._total, n), True
        return self.count

    def ratio(self) -> float | Tensor | None:
        """At a close of statistics: the head's examples over the ``N`` its first calls set (None: no further
        calls), by which the output-gradient statistics of the passes since the last close are multiplied."""
        self._closed = True
        if not self._repeated:
            return None
        first, total = self._first, self._total
        if isinstance(first, int) and isinstance(total, int):
            return total / first
        first_t = count_tensor(first) if isinstance(first, Tensor | RowCount) else first
        total_t = count_tensor(total) if isinstance(total, Tensor | RowCount) else total
        return torch.as_tensor(total_t) / torch.as_tensor(first_t).clamp(min=1)


def _plus(a: Count, b: Count) -> Count:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(a, int) and a == 0:
        return b
    return (count_tensor(a) if not isinstance(a, int) else a) + (count_tensor(b) if not isinstance(b, int) else b)


def _none_on_host(n: Count) -> bool:
    """``n`` is zero and the host knows it without waiting for a device (a number, or a count on the CPU)."""
    if isinstance(n, int):
        return n == 0
    t = n.peaks if isinstance(n, RowCount) else n
    return host_decides(t) and float(n) == 0.0
