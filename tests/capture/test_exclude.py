"""``exclude`` patterns name modules as users write them: a container's name excludes every layer and parameter
under it (``"decoder"``; before, it matched the container alone, which has no weight, and excluded nothing,
silently), a leaf's name or a suffix pattern its layer (``"*.out_proj"``), a parameter's name that parameter. A
pattern that matches nothing is named in a warning at set-up (a typo)."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_soo import PreconditionerManager


def _model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    model.add_module("decoder", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    model.add_module("head", nn.Linear(4, 2))
    return model


UNDER_DECODER = {"decoder.0.weight", "decoder.0.bias", "decoder.1.weight", "decoder.1.bias"}


@pytest.mark.parametrize(("method", "options"), [("kfac", {}), ("psgd", {"precondition_vectors": True})])
@pytest.mark.parametrize(
    ("patterns", "excluded", "layers"),
    [
        (["decoder"], UNDER_DECODER, {"encoder.0", "head"}),
        (["decoder*"], UNDER_DECODER, {"encoder.0", "head"}),
        (["*.0"], {"encoder.0.weight", "encoder.0.bias", "decoder.0.weight", "decoder.0.bias"}, {"head"}),
        (["encoder.1.weight", "head"], {"encoder.1.weight", "head.weight", "head.bias"}, {"encoder.0", "decoder.0"}),
    ],
)
def test_patterns_exclude_what_they_name(
    method: str, options: dict, patterns: list[str], excluded: set[str], layers: set[str]
) -> None:
    messages: list[str] = []
    manager = PreconditionerManager(_model(), method, options, exclude=patterns, warn=messages.append)
    assert set(manager.excluded) == excluded
    vectors = {"encoder.1.weight", "encoder.1.bias", "decoder.1.weight", "decoder.1.bias"} - excluded
    assert set(manager.layers) == layers | (vectors if method == "psgd" else set())
    assert not [m for m in messages if "exclude pattern" in m]


def test_a_pattern_that_matches_nothing_is_named() -> None:
    messages: list[str] = []
    PreconditionerManager(_model(), "kfac", exclude=["decoder", "dekoder", "*.q_proj"], warn=messages.append)
    assert [m for m in messages if "exclude pattern" in m] == [
        "exclude pattern(s) ['dekoder', '*.q_proj'] match no module or parameter name of Sequential"
    ]
