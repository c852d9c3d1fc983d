"""Host work per layer does not grow with depth: on a GPU the Python a step runs per layer is paid in host time
whatever the kernels cost, and a loop over a step's layers nested in another (a check of every bank per member, a
search of the whole layer list per layer) makes a 200-layer model pay 40 000 iterations a step.

Counted: the lines of the library's own code a steady-state step executes (in functions defined under
``lightning_soo/``, via ``sys.settrace``: deterministic, unlike timings, and loops count per iteration, where calls
would not), on the accelerator's path, with and without stacks of equal layers. With ``c(L)`` lines at depth
``L``, a linear cost has ``c(17) − c(9)`` equal to twice ``c(9) − c(5)``; a quadratic one more.
``banks._bank_for`` validated every bank once per member before this test.
"""

from __future__ import annotations

import pytest

from benchmarks.host import library_lines

#: every step option that adds work per layer, on
ALL_ON = {"kl_clip": 1e-3, "grafting": "sgd", "max_update_norm": 1.0}


@pytest.mark.parametrize("options", [{}, ALL_ON], ids=["defaults", "clip-graft-cap"])
@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "stacked"])
@pytest.mark.parametrize("frozen", [False, True], ids=["collecting", "frozen"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_library_lines_grow_linearly_with_depth(
    method: str, frozen: bool, stacked: bool, options: dict[str, object]
) -> None:
    c5, c9, c17 = (library_lines(method, depth, frozen, stacked, **options) for depth in (5, 9, 17))
    first, second = c9 - c5, c17 - c9
    assert first > 0
    assert second <= 2 * first + 4, f"lines at depth 5/9/17: {c5}/{c9}/{c17}: more than linear in depth"


@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "stacked"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_refresh_steps_grow_linearly_with_depth(method: str, stacked: bool) -> None:
    """A refresh step too (the decompositions grouped by shape, the stacks rebuilt)."""
    c5, c9, c17 = (library_lines(method, depth, False, stacked, refresh=True) for depth in (5, 9, 17))
    assert c17 - c9 <= 2 * (c9 - c5) + 4, f"lines at depth 5/9/17: {c5}/{c9}/{c17}: more than linear in depth"
