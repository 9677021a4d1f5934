"""CUDA-only checks of the dispatch paths (skipped, and counted as skipped, without a GPU).

The same checks ran on an H200 in the benchmark session of 2026-11-28 (benchmarks/RESULTS.md):
no host synchronisation in the ``dense`` and ``grouped_mm`` forwards and backwards, and CUDA-graph
capture of the generation forward with replay equal to eager.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters.test_dispatch import make_block, naive_reference, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_PATHS = ["dense", "grouped_mm", "loop"]


def cuda_block(path: str, dtype: torch.dtype, d: int = 64, ff: int = 176, k: int = 4, r: int = 8):
    return make_block(d=d, ff=ff, k=k, r=r, dispatch=path).to("cuda", dtype)


@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paths_match_float64_reference_on_cuda(path, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    block = cuda_block(path, dtype)
    x = torch.randn(96, 64, device="cuda", dtype=dtype)
    out = block(x)
    ref = naive_reference(block.cpu().float(), x.cpu().float())
    assert rel_err(out.float().cpu(), ref) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("path", ["dense", "grouped_mm"])
@pytest.mark.parametrize("train", [False, True])
def test_no_host_sync(path, train):
    block = cuda_block(path, torch.bfloat16)
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    block(x.detach())  # warm up (first calls may allocate and synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if train:
            block(x).float().sum().backward()
        else:
            with torch.no_grad():
                block(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("path", ["dense", "grouped_mm"])
def test_generation_forward_is_cuda_graph_capturable(path):
    block = cuda_block(path, torch.bfloat16).eval()
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                block(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = block(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, block(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_inference_path_matches_dense_and_reference(dtype):
    pytest.importorskip("triton")
    block = cuda_block("triton", dtype, k=8, r=5).eval()
    x = torch.randn(70, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        y = block(x)
        block.dispatch = "dense"
        dense = block(x)
    ref = naive_reference(block.cpu().float(), x.cpu().float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(y.float().cpu(), ref) <= tol
    assert rel_err(y.float().cpu(), dense.float().cpu()) <= tol


def test_triton_inference_path_is_cuda_graph_capturable():
    pytest.importorskip("triton")
    test_generation_forward_is_cuda_graph_capturable("triton")


def test_lora_expand_add_under_bf16_autocast_matches_float32():
    """The trainer's bf16 mode: float32 weights, autocast math; LoRA's in-place expand-add."""
    from torch import nn

    from llava_mole.adapters.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 176), 8, 16.0, 0.0).cuda()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    grads = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    layer.zero_grad()
    ref = layer(x)
    ref.sum().backward()
    assert rel_err(y.float(), ref) <= 2e-2
    for got, want in zip(grads, (layer.lora_A.grad, layer.lora_B.grad)):
        assert rel_err(got, want) <= 3e-2
