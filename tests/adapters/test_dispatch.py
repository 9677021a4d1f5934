"""Every dispatch path against a naive per-token float64 reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_mole.adapters.config import MoLEConfig
from llava_mole.adapters.dispatch import (
    _HAS_GROUPED_MM,
    ExpertGrouping,
    choose_path,
    permute_rows,
    route,
    router_logits,
    scale_rows,
)
from llava_mole.adapters.mole import MoLEMLP
from llava_mole.adapters.state import STATE_ATTR, MoLEState, set_routing_domains

PATHS = ["loop", "grouped_mm", "dense"]


class SwiGLU(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)
        self.act_fn = nn.SiLU()


def make_block(d=24, ff=40, k=4, r=4, top_k=1, gate="prob", dispatch="loop", seed=0) -> MoLEMLP:
    torch.manual_seed(seed)
    cfg = MoLEConfig(
        rank=r,
        alpha=2 * r,
        num_experts=k,
        top_k=top_k,
        dropout=0.0,
        gate_weighting=gate,
        dispatch=dispatch,
    )
    block = MoLEMLP(SwiGLU(d, ff), cfg, 0, MoLEState(cfg, 1, None))
    with torch.no_grad():
        for p in list(block.lora_A.values()) + list(block.lora_B.values()):
            p.normal_(0, 0.3)
        if block.router is not None:
            block.router.weight.normal_(0, 1.0)
    return block


def naive_reference(
    block: MoLEMLP, x: torch.Tensor, force_expert: int | None = None
) -> torch.Tensor:
    """Token by token, in float64, straight from the definition."""
    xd = x.double()
    if block.routes_by_domain:  # every token of sample b on the expert of its domain, p = 1
        experts = block.state.route_experts.repeat_interleave(
            x.shape[0] // len(block.state.route_experts)
        )
        probs = torch.nn.functional.one_hot(experts, block.num_experts).double()
    elif block.router is not None:
        probs = torch.softmax(xd @ block.router.weight.double().T, dim=-1)
    else:
        probs = torch.ones(x.shape[0], 1, dtype=torch.float64)
    rows = []
    for n in range(x.shape[0]):
        top_p, top_e = probs[n].topk(block.top_k)
        if force_expert is not None:
            top_p, top_e = probs[n, force_expert : force_expert + 1], torch.tensor([force_expert])
        weights = {
            "none": torch.ones_like(top_p),
            "straight": top_p / top_p.detach(),  # 1 in value, d log p for the router
        }.get(block.gate_weighting, top_p)

        def proj(name: str, h: torch.Tensor, weights=weights, top_e=top_e) -> torch.Tensor:
            y = h @ getattr(block, name).weight.double().T
            for w, e in zip(weights, top_e.tolist()):
                a = block.lora_A[name][e].double()
                b = block.lora_B[name][e].double()
                y = y + w * block.scaling * (b @ (a @ h))
            return y

        h = torch.nn.functional.silu(proj("gate_proj", xd[n])) * proj("up_proj", xd[n])
        rows.append(proj("down_proj", h))
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_against_reference(
    block: MoLEMLP, x: torch.Tensor, force_expert: int | None = None
) -> None:
    x = x.clone().requires_grad_(True)
    params = [p for p in block.parameters() if p.requires_grad]
    out = block(x)
    ref = naive_reference(block, x, force_expert)
    assert rel_err(out, ref) <= 1e-5
    probe = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * probe).sum(), [x, *params], allow_unused=True)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *params], allow_unused=True)
    for g, rg in zip(grads, ref_grads):
        if rg is None:  # the router with gate_weighting="none": no LM gradient by design
            assert g is None or g.abs().max() == 0
            continue
        assert g is not None
        if rg.abs().max() == 0:
            assert g.abs().max() == 0
        else:
            assert rel_err(g, rg) <= 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_paths_match_reference(path, tokens):
    block = make_block(dispatch=path)
    x = torch.randn(tokens, 24)
    check_against_reference(block, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gate", ["none", "straight"])
def test_unweighted_gates_match_reference(path, gate):
    block = make_block(dispatch=path, gate=gate)
    check_against_reference(block, torch.randn(50, 24))


def test_dense_warmup_weights_by_probability_whatever_the_gate():
    """A dense warmup is the soft mixture ``sum_k p_k delta_k`` for a ``straight`` gate too."""
    block, every_expert = make_block(gate="straight"), make_block(top_k=4)  # same weights
    x = torch.randn(40, 24)
    block.state.dense_routing = True
    block.train()
    assert torch.allclose(block(x), every_expert(x), atol=1e-6)
    block.eval()  # top-1 again, gate 1
    assert torch.equal(block(x), make_block(gate="none")(x))


def test_straight_gate_has_lora_scale_and_trains_the_router():
    """``straight``: the outputs of ``none`` exactly, but the LM gradient reaches the router."""
    x = torch.randn(30, 24)
    straight, none = make_block(gate="straight"), make_block(gate="none")  # same weights
    out = straight(x)
    assert torch.equal(out, none(x))
    out.square().sum().backward()
    assert straight.router.weight.grad.abs().max() > 0
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], requires_grad=True)
    weights = route(logits, gate_weighting="straight").weights
    assert torch.equal(weights, torch.ones(2, 1))
    upstream = torch.tensor([1.0, -2.0])
    (weights[:, 0] * upstream).sum().backward()
    plain = logits.detach().requires_grad_()
    log_p = torch.log_softmax(plain, -1)[[0, 1], [0, 1]]  # the chosen experts: 0 and 1
    (log_p * upstream).sum().backward()
    assert torch.allclose(logits.grad, plain.grad, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_dense_routing_is_the_probability_weighted_sum_of_all_experts(path):
    """``set_dense_routing``: in training, exactly a top-K block; in eval, top-1 again."""
    block = make_block(dispatch=path)
    every_expert = make_block(dispatch=path, top_k=4)  # same seed: same weights
    x = torch.randn(40, 24)
    block.state.dense_routing = True
    block.train()
    out = block(x)
    assert torch.allclose(out, every_expert(x), atol=1e-6)
    block.top_k = 4  # the float64 reference of every expert weighted by p (sum p = 1)
    check_against_reference(block, x)
    block.top_k = 1
    block.eval()
    ref_top1 = naive_reference(block, x)
    assert rel_err(block(x), ref_top1) <= 1e-5
    assert rel_err(out, ref_top1) > 1e-3  # the two phases really differ


@pytest.mark.parametrize("path", PATHS)
def test_domain_router_sends_each_sample_to_its_domain_expert(path):
    torch.manual_seed(0)
    cfg = MoLEConfig(
        rank=4, alpha=8, num_experts=3, dropout=0.0, dispatch=path, router="domain",
        router_domains=("general", "document", "biomedical"),
    )  # fmt: skip
    block = MoLEMLP(SwiGLU(24, 40), cfg, 0, MoLEState(cfg, 1, None))
    assert block.router is None and not any("router" in n for n, _ in block.named_parameters())
    with torch.no_grad():
        for p in list(block.lora_A.values()) + list(block.lora_B.values()):
            p.normal_(0, 0.3)
    x = torch.randn(4, 5, 24)  # 4 samples of 5 tokens
    with pytest.raises(RuntimeError, match="routes by domain label"):
        block(x)
    model = nn.Module()
    model.__dict__[STATE_ATTR] = block.state
    with pytest.raises(ValueError, match="domain 'legal' has no expert"):
        set_routing_domains(model, ["general", "legal", "general", "document"])
    set_routing_domains(model, ["biomedical", "general", "document", "biomedical"])
    assert block.state.route_experts.tolist() == [2, 0, 1, 2]
    check_against_reference(block, x.reshape(20, 24))
    block.eval()
    with torch.no_grad():  # generation: one new token per sample
        step = torch.randn(4, 1, 24)
        assert (
            rel_err(block(step).reshape(4, 24), naive_reference(block, step.reshape(4, 24))) < 1e-5
        )


@pytest.mark.parametrize("path", PATHS)
def test_all_tokens_to_one_expert_and_empty_experts(path):
    block = make_block(dispatch=path, k=5)
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[2, 0] = 2.0  # expert 2 wins for every token with x[:, 0] > 0
    x = torch.randn(64, 24)
    x = x * 0.1
    x[:, 0] = x[:, 0].abs() + 1.0
    _, routing = block.route(x)
    assert (routing.experts[:, 0] == 2).all()
    check_against_reference(block, x)
    # Idle experts are still in the graph: zero, not None, gradients.
    loss = block(x).sum()
    loss.backward()
    for name in ("gate_proj", "up_proj", "down_proj"):
        grad = block.lora_A[name].grad
        assert grad is not None
        assert grad[0].abs().max() == 0 and grad[2].abs().max() > 0


@pytest.mark.parametrize("path", PATHS)
def test_odd_sizes_and_top2(path):
    block = make_block(d=13, ff=29, k=3, r=5, dispatch=path, seed=3)
    check_against_reference(block, torch.randn(11, 13))
    block2 = make_block(d=13, ff=29, k=3, r=5, dispatch=path, top_k=2, seed=4)
    check_against_reference(block2, torch.randn(17, 13))


def test_single_expert_is_plain_lora():
    block = make_block(k=1)
    assert block.router is None
    check_against_reference(block, torch.randn(9, 24))


def test_grouped_mm_backward_with_stride0_gradient():
    block = make_block(dispatch="grouped_mm")
    x = torch.randn(40, 24, requires_grad=True)
    block(x).sum().backward()  # y.sum() gives an expanded (stride-0) gradient
    assert torch.isfinite(x.grad).all()


def test_grouping_and_permutation_backward_is_a_gather():
    experts = torch.tensor([2, 0, 2, 1, 0, 2])
    grouping = ExpertGrouping.from_experts(experts, 4)
    assert grouping.counts.tolist() == [2, 1, 3, 0]
    assert grouping.offsets.dtype == torch.int32 and grouping.offsets.tolist() == [2, 3, 6, 6]
    assert experts[grouping.order].tolist() == [0, 0, 1, 2, 2, 2]
    x = torch.randn(6, 3, requires_grad=True)
    y = permute_rows(x, grouping.order, grouping.inverse)
    assert torch.equal(y, x[grouping.order])
    probe = torch.randn(6, 3)
    (y * probe).sum().backward()
    assert torch.equal(x.grad, probe[grouping.inverse])
    assert y.grad_fn.name().endswith("PermuteRowsBackward")


def test_router_weight_is_raw_max_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    routing = route(logits, top_k=1)
    probs = torch.softmax(logits, -1)
    assert torch.equal(routing.experts[:, 0], torch.tensor([0, 1]))
    assert torch.allclose(routing.weights[:, 0], probs.max(-1).values)
    assert (routing.weights < 1).all()
    assert torch.equal(route(logits, gate_weighting="none").weights, torch.ones(2, 1))


def test_router_logits_match_float32_linear_and_keep_no_float32_copy():
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 32, requires_grad=True)
    probe = torch.randn(64, 4)

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = router_logits(x, weight)
    assert logits.dtype == torch.float32
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    (logits * probe).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref.float(), w_ref)
    (ref * probe).sum().backward()
    assert torch.equal(logits, ref)
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), x_ref.grad.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_state_records_no_loss_terms_without_grad_but_keeps_them_for_training():
    block = make_block(dispatch="dense")
    x = torch.randn(10, 24)
    with torch.no_grad():
        block(x)
    assert block.state.balance == [] and block.state.loads == []
    block(x)
    assert len(block.state.balance) == 1 and len(block.state.loads) == 1


class _FakeCuda:
    """Enough of a tensor for choose_path: a CUDA input of some shape and dtype."""

    is_cuda = True

    def __init__(self, tokens: int, dtype: torch.dtype = torch.bfloat16) -> None:
        self.shape = (tokens, 4096)
        self.dtype = dtype


@pytest.mark.parametrize(
    ("x", "k", "r", "top_k", "expected"),
    [
        (torch.zeros(5, 8), 8, 128, 1, "loop"),  # CPU: the loop beyond K*r = 32
        (torch.zeros(50000, 8), 4, 16, 1, "loop"),  # K*r = 64
        (torch.zeros(50000, 8), 2, 16, 1, "dense"),  # K*r = 32: dense at any token count
        (torch.zeros(1, 8), 3, 1, 1, "dense"),  # the demo's K=3, r=1
        (torch.zeros(5, 8), 4, 16, 2, "dense"),  # top-2 always dense
        (_FakeCuda(64), 8, 128, 1, "dense"),  # generation on GPU
        (_FakeCuda(16384), 8, 16, 1, "dense"),  # K*r = 128
        (_FakeCuda(16384), 2, 128, 1, "dense"),  # K*r = 256
        (_FakeCuda(16384), 4, 128, 1, "grouped_mm"),  # K*r = 512
        (_FakeCuda(16384, torch.float32), 8, 128, 1, "loop"),
    ],
)
def test_auto_dispatch_follows_the_measured_rules(x, k, r, top_k, expected):
    if expected == "grouped_mm" and not _HAS_GROUPED_MM:
        expected = "loop"
    assert choose_path("auto", x, k, r, top_k) == expected


def test_explicit_dispatch_is_kept_except_sorted_paths_for_top2():
    x = torch.zeros(3, 8)
    assert choose_path("dense", x, 4, 8, 1) == "dense"
    assert choose_path("loop", x, 4, 8, 2) == "dense"


@pytest.mark.parametrize("path", ["loop", "grouped_mm"])
def test_grouped_paths_keep_no_sorted_copy_of_the_input(path):
    """Without dropout, autograd keeps x (shared with the router), never a permuted copy."""
    block = make_block(d=24, ff=40, dispatch=path)
    x = torch.randn(50, 24, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = block(x)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x_nbytes = x.numel() * x.element_size()
    big = [
        t.untyped_storage()
        for t in saved
        if t.shape[-1:] == x.shape[-1:]  # rows of the block input (not the d_ff activations)
        and t.untyped_storage().nbytes() >= x_nbytes
        and t.untyped_storage().data_ptr() not in params
    ]
    assert big and all(st.data_ptr() == x.untyped_storage().data_ptr() for st in big)
    check_against_reference(block, x.detach())  # and the gradients are still exact
    assert out.shape == x.shape


def _saved_rank_activations(block: MoLEMLP, x: torch.Tensor) -> int:
    """How many distinct (token x rank-r) activations autograd keeps for one forward."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block(x)
    n, r, k = x.shape[0], block.rank, block.num_experts
    sizes = {n * r * x.element_size(), n * k * r * x.element_size()}
    # By storage: the grouped paths save per-expert row slices of one (N, r) tensor.
    storages = {t.untyped_storage() for t in saved}
    return len({st.data_ptr() for st in storages if st.nbytes() in sizes})


@pytest.mark.parametrize("path", PATHS)
def test_gated_experts_keep_no_more_rank_activations_than_lora(path):
    """LoRA keeps one ``A x`` per projection for B's gradient; MoLE only the gated product."""
    x = torch.randn(50, 24, requires_grad=True)
    lora_like = make_block(k=1, r=6, dispatch=path)  # one expert: LoRA's own operations
    assert _saved_rank_activations(lora_like, x) == 3
    block = make_block(k=3, r=6, dispatch=path)
    assert _saved_rank_activations(block, x) == 3
    check_against_reference(block, x.detach())


def test_scale_rows_gradients_match_the_product():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(7, 1, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(scale_rows, (h, w))
    dense_h = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    dense_w = (torch.rand(7, 3, 1, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(scale_rows, (dense_h, dense_w))
    # A zero weight (an unchosen expert in the dense path) gets a zero gradient, not a NaN.
    w0 = torch.tensor([[0.0], [2.0]], requires_grad=True)
    h0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    scale_rows(h0, w0).sum().backward()
    assert torch.equal(w0.grad, torch.tensor([[0.0], [7.0]]))
    assert torch.equal(h0.grad, torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
