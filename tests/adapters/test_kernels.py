"""The fused Triton inference kernels, checked on CPU with Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the checks run in a fresh
interpreter. Skipped (and counted as skipped) where Triton is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECKS = textwrap.dedent(
    """
    import json, sys
    import torch
    from llava_mole.adapters import kernels
    from llava_mole.adapters.dispatch import choose_path
    from tests.adapters.test_dispatch import make_block, naive_reference, rel_err

    assert kernels.INTERPRET and kernels.HAS_TRITON
    torch.manual_seed(0)
    out = {"kernel": [], "block": {}}
    # (tokens, in, out, experts, rank): odd widths, rank 1, a rank that is not a power of 2,
    # more experts than tokens (idle experts), one token, a rank split over two programs.
    for n, d_in, d_out, k, r in [(7, 24, 40, 4, 3), (33, 130, 70, 3, 8), (1, 64, 64, 2, 1),
                                 (5, 16, 300, 8, 5), (6, 40, 24, 3, 20)]:
        x = torch.randn(n, d_in)
        a, b = torch.randn(k, r, d_in), torch.randn(k, d_out, r)
        experts, gate = torch.randint(0, k, (n,)), torch.rand(n)
        y0 = torch.randn(n, d_out)
        ref = y0.double().clone()
        for i in range(n):
            e = int(experts[i])
            ref[i] += 0.5 * gate[i].double() * (b[e].double() @ (a[e].double() @ x[i].double()))
        y = y0.clone()
        kernels.gathered_lora_add_(y, x, a, b, experts, gate, 0.5)
        out["kernel"].append(rel_err(y, ref))

    block = make_block(k=4, r=4, dispatch="triton").eval()
    x = torch.randn(50, 24)
    with torch.no_grad():
        out["block"]["path_no_grad"] = choose_path("triton", x, 4, 4, 1)
        y = block(x)
    out["block"]["vs_reference"] = rel_err(y, naive_reference(block, x))
    block.dispatch = "dense"
    with torch.no_grad():
        out["block"]["vs_dense"] = rel_err(y, block(x))
    block.dispatch = "triton"
    out["block"]["path_with_grad"] = choose_path("triton", x, 4, 4, 1)
    out["block"]["path_auto"] = choose_path("auto", x, 4, 4, 1)
    out["block"]["path_top2"] = choose_path("triton", x, 4, 4, 2)
    xg = x.clone().requires_grad_(True)
    block(xg).sum().backward()  # falls back to a PyTorch path, so gradients flow
    out["block"]["grad_finite"] = bool(torch.isfinite(xg.grad).all())
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", CHECKS], env=env, cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gathered_lora_add_matches_float64_reference(interpreted):
    assert len(interpreted["kernel"]) == 5
    assert max(interpreted["kernel"]) <= 1e-5


def test_triton_block_matches_reference_and_dense_path(interpreted):
    block = interpreted["block"]
    assert block["path_no_grad"] == "triton"
    assert block["vs_reference"] <= 1e-5
    assert block["vs_dense"] <= 1e-5


def test_triton_dispatch_falls_back_where_kernels_do_not_apply(interpreted):
    block = interpreted["block"]
    # Training needs autograd: the CPU auto choice, whatever that is.
    assert block["path_with_grad"] == block["path_auto"] != "triton"
    assert block["path_top2"] == "dense"
    assert block["grad_finite"]
