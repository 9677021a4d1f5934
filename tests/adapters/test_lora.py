"""Plain LoRA: the fused expand-add against the definition, in and out of place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_mole.adapters.lora import LoRALinear, add_expand_


def _random_lora(base: nn.Linear, rank: int = 3, alpha: float = 6.0, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(base, rank, alpha, 0.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; a random B makes the update visible
    return layer


def _reference(layer: LoRALinear, x: torch.Tensor, dy: torch.Tensor):
    """Output and gradients in float64, straight from ``W x + b + s B A x``."""
    xd = x.detach().double().requires_grad_(True)
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    w = layer.base.weight.double()
    bias = layer.base.bias.double() if layer.base.bias is not None else 0.0
    y = xd @ w.T + bias + layer.scaling * (xd @ a.T) @ b.T
    y.backward(dy.double())
    return y.detach(), xd.grad, a.grad, b.grad


class _QuantisedLikeLinear(nn.Linear):
    """An ``nn.Linear`` subclass, as quantised layers are: LoRA must not write into its output."""


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
@pytest.mark.parametrize("base_cls", [nn.Linear, _QuantisedLikeLinear])
def test_lora_linear_matches_definition(shape, base_cls):
    layer = _random_lora(base_cls(12, 9, bias=True))
    assert layer._fuse is (base_cls is nn.Linear)
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape[:-1], 9)
    y = layer(x)
    y.backward(dy)
    ref_y, ref_gx, ref_ga, ref_gb = _reference(layer, x, dy)
    assert y.shape == (*shape[:-1], 9)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), ref_ga, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), ref_gb, rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is None


def test_add_expand_accumulates_in_place_and_falls_back_out_of_place():
    torch.manual_seed(0)
    h, b = torch.randn(6, 2), torch.randn(5, 2)
    y = torch.randn(6, 5)
    expected = y + h @ b.T
    out = add_expand_(y.clone(), h, b)
    torch.testing.assert_close(out, expected)
    y2 = y.clone()
    assert add_expand_(y2, h, b).data_ptr() == y2.data_ptr()  # no new (N, out) tensor
    y4 = y.clone()
    kept = add_expand_(y4, h, b, in_place=False)  # a base layer that may need its output
    torch.testing.assert_close(kept, expected)
    torch.testing.assert_close(y4, y)
    # A 3-D or differently typed base output is never written: the sum is a new tensor.
    y3 = y.clone().view(2, 3, 5)
    out3 = add_expand_(y3, h.view(2, 3, 2), b)
    torch.testing.assert_close(out3, expected.view(2, 3, 5))
    assert out3.data_ptr() != y3.data_ptr()
    y_bf16 = y.bfloat16()
    out_bf16 = add_expand_(y_bf16, h, b)
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.data_ptr() != y_bf16.data_ptr()


def test_add_expand_gradients_match_unfused():
    torch.manual_seed(1)
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(6, 4)
    h = torch.randn(8, 3, requires_grad=True)
    b = torch.randn(6, 3, requires_grad=True)
    dy = torch.randn(8, 6)
    add_expand_(x @ w.T, h, b).backward(dy)
    grads = [t.grad.clone() for t in (x, h, b)]
    for t in (x, h, b):
        t.grad = None
    (x @ w.T + h @ b.T).backward(dy)
    for got, t in zip(grads, (x, h, b)):
        torch.testing.assert_close(got, t.grad)


def test_lora_linear_under_bf16_autocast_matches_float32():
    layer = _random_lora(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer(x)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)


def test_lora_linear_trains_when_the_input_needs_no_gradient():
    """First-layer case: frozen embeddings give an input without grad; the in-place add must
    still put the adapter into the graph."""
    layer = _random_lora(nn.Linear(12, 9))
    x = torch.randn(5, 12)
    dy = torch.randn(5, 9)
    y = layer(x)
    assert y.requires_grad
    y.backward(dy)
    _, _, ref_ga, ref_gb = _reference(layer, x, dy)
    torch.testing.assert_close(layer.lora_A.grad.double(), ref_ga, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), ref_gb, rtol=1e-5, atol=1e-5)
