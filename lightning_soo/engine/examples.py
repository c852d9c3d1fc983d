"""The loss's number of examples ``N`` in a backward pass, read off the layer nearest the loss.

A mean loss's ``1/N`` is undone in the output-gradient statistics: ``B = (1/N) Σ_rows b bᵀ`` with ``b = N·δ`` the
per-example loss's gradient. A layer with fewer rows than the loss has examples, each row one example's (the
experts of a mixture-of-experts layer: the rows routed to them; a branch run on part of the batch), takes the
loss's ``N``: its empirical Fisher averages over every example, the zero gradients of those it never saw included.
Counting its own rows instead made ``B`` a factor rows/``N`` too small (an expert's update larger by the inverse of
its share of the tokens).

A layer with more rows than the head (several per example: the tokens of an image classifier, a source longer
than the target) keeps its own count of rows. There the Fisher's scale lies between K-FAC-expand's ``N`` (rows
whose per-example gradients are uncorrelated) and the rows' count (fully correlated ones, as the pooled tokens of
an image are); on a small ViT on digits the rows' count trained faster (README, Limits). A convolution's examples
are the batch: it takes ``N`` when the head has as many (a CNN classifier, a GAN's discriminator), with the same
numbers as before but for a head called twice.

The layer nearest the loss is the one whose output gradient autograd computes first after the forward pass: a
classifier's head, a language model's head (rows whose output gradient is exactly zero are not examples, so a loss
over some tokens only counts those). Its count (``Observation.n``) is ``N`` for the backward pass; a layer taking
it adds it to its divisor once per pass, however many calls it has. Where the head is called again in the pass (a
siamese model, a GAN's discriminator on real and fake images: one loss over both calls' examples), the statistics
are multiplied at the close by the ratio of all its calls' count to the first's (``ratio``).

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

    __slots__ = ("_closed", "_first", "_head", "_repeated", "_total", "count", "fresh", "passes", "rows", "step_passes")

    def __init__(self) -> None:
        self.fresh = True  # a forward pass ran since the last output gradient: the next one is the head's
        self.count: Count = 0
        self.rows = 0  # the head's examples at most (rows, padding included): a call with more has several per example
        self.passes = 0
        self.step_passes = 0  # the backward passes since the statistics last closed
        self._head: object = None  # the use whose call set ``N``
        self._first: Count = 0  # the sum of the passes' ``N`` since the statistics last closed
        self._total: Count = 0  # the same with the head's further calls
        self._repeated = False
        self._closed = False

    def forward_call(self) -> None:
        """A managed call in a forward pass (not a recomputation inside a backward pass)."""
        if not self.fresh and torch._C._current_graph_task_id() == -1:
            self.fresh = True

    def arrive(self, n: Count, use: object, rows: int) -> Count:
        """An output gradient of a call of ``use`` (a layer's use) with ``n`` examples of at most ``rows`` arrived:
        the first after a forward pass sets ``N``, unless the host knows it has none (a branch the loss multiplies by
        zero); a further call of the same use in the pass adds to the close's count. Returns ``N`` (``n`` for a
        call without any)."""
        if self.fresh:
            if _none_on_host(n):
                return n
            if self._closed:
                self._first, self._total, self._repeated, self._closed = 0, 0, False, False
                self.step_passes = 0
            self.fresh, self.count, self._head, self.rows = False, n, use, rows
            self.passes += 1
            self.step_passes += 1
            self._first, self._total = add_counts(self._first, n), add_counts(self._total, n)
        elif use is self._head:
            self._total, self._repeated = add_counts(self._total, n), True
        return self.count

    def step_count(self) -> Count:
        """The loss's examples in the backward passes whose statistics close now (the sum of their ``N``)."""
        return self._first

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


def add_counts(a: Count, b: Count) -> Count:
    """``a + b`` as a number where both are, else as a tensor (no device read)."""
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


def missed_count(total: Count, counted: Count) -> Count | None:
    """``total - counted``: the loss's examples of the passes a layer was not called in (None: none, known on the
    host)."""
    if isinstance(total, int) and isinstance(counted, int):
        return total - counted if total != counted else None
    t = count_tensor(total) if isinstance(total, Tensor | RowCount) else total
    c = count_tensor(counted) if isinstance(counted, Tensor | RowCount) else counted
    return t - c
