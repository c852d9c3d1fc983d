"""Every public constructor argument is validated at construction, with a message naming it (property-based)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_soo import (
    CurvatureScheduler,
    GaussNewtonCallback,
    KFACCallback,
    PreconditionerManager,
    PSGDCallback,
    ShampooCallback,
)

BAD_INTS = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=3), st.booleans())
BAD_FLOATS = st.one_of(st.just(math.nan), st.just(math.inf), st.text(min_size=1, max_size=3), st.just(None))

KFAC_BAD = {
    "damping": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.text(max_size=3)),
    "factor_decay": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), BAD_FLOATS),
    "statistics_interval": BAD_INTS,
    "preconditioner_interval": BAD_INTS,
    "inverse": st.text(max_size=8).filter(lambda s: s not in ("cholesky", "eigen")),
    "max_factor_dim": BAD_INTS,
    "exclude": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.integers(), min_size=1, max_size=2)),
    "weight_sharing": st.text(max_size=8).filter(lambda s: s not in ("expand", "reduce")),
    "loss_reduction": st.text(max_size=8).filter(lambda s: s not in ("mean", "sum")),
    "kl_clip": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.text(min_size=1, max_size=3)),
    "grad_worker_fraction": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), BAD_FLOATS),
    "max_update_norm": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.text(min_size=1, max_size=3)),
}

KFAC_GOOD = st.fixed_dictionaries(
    {},
    optional={
        "damping": st.floats(1e-9, 10.0),
        "factor_decay": st.floats(0.0, 0.999),
        "statistics_interval": st.integers(1, 100),
        "preconditioner_interval": st.integers(1, 1000),
        "inverse": st.sampled_from(["cholesky", "eigen"]),
        "max_factor_dim": st.integers(1, 10_000),
        "exclude": st.lists(st.text(max_size=5), max_size=3),
        "weight_sharing": st.sampled_from(["expand", "reduce"]),
        "loss_reduction": st.sampled_from(["mean", "sum"]),
        "kl_clip": st.one_of(st.none(), st.floats(1e-6, 1.0)),
        "grad_worker_fraction": st.floats(0.01, 1.0),
        "max_update_norm": st.one_of(st.none(), st.floats(1e-6, 1e3)),
    },
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(KFAC_BAD)))
def test_kfac_rejects_bad_values(data: st.DataObject, name: str) -> None:
    value = data.draw(KFAC_BAD[name])
    with pytest.raises(ValueError, match=f"`{name}`"):
        KFACCallback(**{name: value})


@settings(max_examples=40, deadline=None)
@given(kwargs=KFAC_GOOD)
def test_kfac_accepts_good_values(kwargs: dict) -> None:
    KFACCallback(**kwargs)


def _choice(*accepted: object) -> st.SearchStrategy:
    return st.text(max_size=8).filter(lambda s: s not in accepted)


COMMON_BAD = {k: KFAC_BAD[k] for k in ("exclude", "kl_clip", "grad_worker_fraction", "max_update_norm")}
SHAMPOO_BAD = {
    **COMMON_BAD,
    "damping": KFAC_BAD["damping"],
    "statistics": _choice("per_example", "gradient"),
    "exponent": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), BAD_FLOATS),
    "damping_mode": _choice("absolute", "relative"),
    "accumulate": _choice("ema", "sum"),
    "beta": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), BAD_FLOATS),
    "grafting": _choice("sgd"),
    "statistics_interval": BAD_INTS,
    "preconditioner_interval": BAD_INTS,
    "max_factor_dim": BAD_INTS,
    "weight_sharing": _choice("expand", "reduce"),
    "loss_reduction": _choice("mean", "sum"),
}
GAUSS_NEWTON_BAD = {
    **COMMON_BAD,
    "damping": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.text(max_size=3)),
    "damping_mode": _choice("absolute", "relative"),
    "statistics_interval": BAD_INTS,
    "preconditioner_interval": BAD_INTS,
    "max_examples": BAD_INTS,
    "weight_sharing": _choice("expand", "reduce"),
    "loss_reduction": _choice("mean", "sum"),
    "grafting": _choice("sgd"),
}
PSGD_BAD = {
    **COMMON_BAD,
    "fit": _choice("whitening", "hessian"),
    "lr_preconditioner": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), BAD_FLOATS),
    "init_scale": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.text(min_size=1, max_size=3)),
    "max_update_probability": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), BAD_FLOATS),
    "min_update_probability": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), BAD_FLOATS),
    "update_decay": st.one_of(st.floats(max_value=-1e-9), BAD_FLOATS),
    "flat_steps": st.one_of(st.integers(max_value=-1), st.text(min_size=1, max_size=3), st.booleans()),
    "max_factor_dim": BAD_INTS,
    "grafting": _choice("sgd"),
    "preconditioner_interval": BAD_INTS,
}
METHOD_BAD = {ShampooCallback: SHAMPOO_BAD, GaussNewtonCallback: GAUSS_NEWTON_BAD, PSGDCallback: PSGD_BAD}


@settings(max_examples=120, deadline=None)
@given(data=st.data(), cls=st.sampled_from(list(METHOD_BAD)))
def test_other_methods_reject_bad_values(data: st.DataObject, cls: type) -> None:
    name = data.draw(st.sampled_from(sorted(METHOD_BAD[cls])))
    value = data.draw(METHOD_BAD[cls][name])
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**{name: value})


@settings(max_examples=40, deadline=None)
@given(
    shampoo=st.fixed_dictionaries(
        {},
        optional={
            "statistics": st.sampled_from(["per_example", "gradient"]),
            "exponent": st.floats(0.01, 1.0),
            "damping_mode": st.sampled_from(["absolute", "relative"]),
            "accumulate": st.sampled_from(["ema", "sum"]),
            "grafting": st.sampled_from(["sgd", None]),
            "max_factor_dim": st.integers(1, 10_000),
        },
    ),
    gauss_newton=st.fixed_dictionaries(
        {}, optional={"damping": st.floats(1e-9, 10.0), "max_examples": st.integers(1, 10_000)}
    ),
    psgd=st.fixed_dictionaries(
        {},
        optional={
            "fit": st.sampled_from(["whitening", "hessian"]),
            "lr_preconditioner": st.floats(1e-4, 1.0),
            "init_scale": st.one_of(st.none(), st.floats(1e-3, 1e3)),
            "min_update_probability": st.floats(1e-3, 1.0),
            "flat_steps": st.integers(0, 1000),
        },
    ),
)
def test_other_methods_accept_good_values(shampoo: dict, gauss_newton: dict, psgd: dict) -> None:
    ShampooCallback(**shampoo)
    GaussNewtonCallback(**gauss_newton)
    PSGDCallback(**psgd)


CURVATURE_BAD = {
    "frequent_fraction": st.one_of(st.floats(min_value=1.0001), st.floats(max_value=-1e-9), BAD_FLOATS),
    "frequent_interval": BAD_INTS,
    "interval": st.one_of(st.integers(max_value=0), st.text(min_size=1, max_size=3)),
    "statistics_interval": st.one_of(st.integers(max_value=0), st.floats(allow_nan=True)),
    "tolerance": st.one_of(st.floats(max_value=0.0), BAD_FLOATS),
    "patience": BAD_INTS,
    "quality_every_n_steps": st.one_of(st.integers(max_value=0), st.floats(allow_nan=True)),
    "num_probes": BAD_INTS,
    "quality_patience": st.one_of(st.integers(max_value=0), st.text(min_size=1, max_size=3)),
    "quality_tolerance": st.one_of(st.floats(max_value=-1e-9), BAD_FLOATS),
    "adaptive": st.one_of(st.integers(2, 5), st.text(min_size=1, max_size=3)),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(CURVATURE_BAD)))
def test_curvature_scheduler_rejects_bad_values(data: st.DataObject, name: str) -> None:
    value = data.draw(CURVATURE_BAD[name])
    with pytest.raises(ValueError, match=f"`{name}`"):
        CurvatureScheduler(**{name: value})


def test_messages_name_value_and_accepted() -> None:
    with pytest.raises(ValueError, match=r"`inverse` must be one of 'cholesky', 'eigen'; got 'lu'"):
        KFACCallback(inverse="lu")
    with pytest.raises(ValueError, match=r"`factor_decay` must be a finite number in \[0, 1\), got 1.5"):
        KFACCallback(factor_decay=1.5)


def test_manager_rejects_unknown_method() -> None:
    import torch

    with pytest.raises(ValueError, match="method='adam' is not known"):
        PreconditionerManager(torch.nn.Linear(2, 2), "adam")


MANAGER_BAD = [
    ("kfac", {"statistics_interval": 0}, "statistics_interval"),
    ("kfac", {"preconditioner_interval": 0}, "preconditioner_interval"),
    ("kfac", {"kl_clip": -1}, "kl_clip"),
    ("kfac", {"max_update_norm": -1}, "max_update_norm"),
    ("kfac", {"grafting": "adam"}, "grafting"),
    ("kfac", {"loss_reduction": "avg"}, "loss_reduction"),
    ("kfac", {"weight_sharing": "x"}, "weight_sharing"),
    ("kfac", {"inverse": "bogus"}, "inverse"),
    ("kfac", {"damping": 0}, "damping"),
    ("kfac", {"damping": lambda: 1.0}, "damping"),
    ("shampoo", {"exponent": -1}, "exponent"),
    ("gauss_newton", {"max_examples": 0}, "max_examples"),
    ("psgd", {"damping": 1e-3}, "damping"),
    ("kfac", {"no_such_option": 1}, "no_such_option"),
]


@pytest.mark.parametrize(("method", "kwargs", "name"), MANAGER_BAD)
def test_manager_checks_every_option_at_construction(method: str, kwargs: dict, name: str) -> None:
    """The options dataclasses check for the manager too (they are the one home of the checks)."""
    import torch

    with pytest.raises(ValueError, match=name):
        PreconditionerManager(torch.nn.Linear(2, 2), method, **kwargs)


def test_damping_rules_check_their_arguments_and_values() -> None:
    import torch

    from lightning_soo import ScaledDamping

    with pytest.raises(ValueError, match="reference_lr"):
        ScaledDamping(1e-3, reference_lr=0, reference_batch_size=32)
    with pytest.raises(ValueError, match="reference_batch_size"):
        ScaledDamping(1e-3, reference_lr=0.1, reference_batch_size=0)
    lin = torch.nn.Linear(2, 2)
    manager = PreconditionerManager(lin, damping=lambda step, lr, batch_size: math.inf)
    manager.begin_step()
    lin(torch.randn(4, 2)).sum().backward()
    with pytest.raises(ValueError, match="damping evaluated to inf at step 0"):
        manager.step()


def test_damping_callables_get_step_lr_and_batch_size() -> None:
    import torch

    seen: list[tuple] = []
    lin = torch.nn.Linear(2, 2)
    manager = PreconditionerManager(
        lin, damping=lambda step, lr, batch_size: seen.append((step, lr, batch_size)) or 0.1
    )
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    manager.begin_step(batch_size=4)
    lin(torch.randn(4, 2)).sum().backward()
    manager.step(opt)
    assert seen == [(0, 0.5, 4)]


def test_boolean_options_take_booleans_only() -> None:
    with pytest.raises(ValueError, match="`adaptive`"):
        CurvatureScheduler(adaptive=1)  # type: ignore[arg-type]
