"""Dispatch strategies (adapters/experts.py): each path's expert deltas against the definition."""

from __future__ import annotations

import pytest
import torch

from llava_mole.adapters.dispatch import choose_path, route
from llava_mole.adapters.experts import STRATEGIES, ExpertDeltas, SingleExpert, expert_deltas


def _definition(x, a, b, routing, scaling):
    """``sum_j g_j * scaling * B_{e_j} A_{e_j} x_n`` per row, in float64."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for e, g in zip(routing.experts[n].tolist(), routing.weights[n].double()):
            out[n] += g * scaling * (b[e].double() @ (a[e].double() @ x[n].double()))
    return out


@pytest.mark.parametrize(
    ("path", "top_k", "of_input"),
    [
        ("dense", 1, True),
        ("dense", 2, True),
        ("loop", 1, True),
        ("loop", 1, False),
        ("grouped_mm", 1, True),
        ("grouped_mm", 1, False),
    ],
)
def test_strategy_adds_the_routed_expert_deltas(path, top_k, of_input):
    torch.manual_seed(0)
    n, d_in, d_out, k, r = 37, 16, 24, 4, 3
    x, w = torch.randn(n, d_in), torch.randn(d_out, d_in)
    a = {"up_proj": torch.randn(k, r, d_in, requires_grad=True)}
    b = {"up_proj": torch.randn(k, d_out, r, requires_grad=True)}
    routing = route(torch.randn(n, k), top_k)
    deltas = expert_deltas(path, a, b, 0.5, False, routing, k, dropout_active=False)
    assert isinstance(deltas, STRATEGIES[path])
    h = deltas.enter(x)  # the block's rows in the strategy's order; the base runs on them
    out = deltas.leave(deltas.add("up_proj", h @ w.T, h, h, of_input))
    ref = (x @ w.T).double() + _definition(x, a["up_proj"], b["up_proj"], routing, 0.5)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # every expert is in the graph, chosen or not
    assert a["up_proj"].grad is not None and b["up_proj"].grad is not None


def test_single_expert_is_lora_with_its_own_dropout_draws():
    torch.manual_seed(0)
    x, y = torch.randn(5, 8), torch.randn(5, 6)
    a, b = {"down_proj": torch.randn(1, 2, 8)}, {"down_proj": torch.randn(1, 6, 2)}
    deltas = SingleExpert(a, b, 2.0, fuse=False)
    assert not deltas.shares_dropout and deltas.enter(x) is x
    out = deltas.add("down_proj", y, x, x, of_input=False)
    assert torch.allclose(out, y + 2.0 * x @ a["down_proj"][0].T @ b["down_proj"][0].T)


@pytest.mark.parametrize("requested", ["auto", "loop", "grouped_mm", "dense", "triton"])
@pytest.mark.parametrize(("k", "r", "top_k"), [(3, 1, 1), (8, 128, 1), (4, 16, 2)])
def test_every_path_choose_path_picks_has_a_strategy(requested, k, r, top_k):
    path = choose_path(requested, torch.zeros(9, 8), k, r, top_k)
    assert issubclass(STRATEGIES[path], ExpertDeltas)
