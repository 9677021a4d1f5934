"""Several CPU processes (torchrun, gloo) against one process with the same global batch.

Each run is a real `llava-mole train` under torchrun on the tiny LLaVA (no mocked engines):
plain DDP, DeepSpeed ZeRO-2 (as a 2-"node" launch on 127.0.0.1), ZeRO-3 and FSDP2, with MoLE
(K=3) and plain LoRA. Every run is compared with a one-process run of the same global batch
(2 x 4 against 1 x 8): per-step losses, balance loss and expert loads, and the final adapter
(names, shapes, values).

Tolerance: losses rel 1e-5, adapter tensors atol 2e-5 (measured: <= 2e-7 relative on the
losses, <= 1.3e-6 on the adapters). The arithmetic is the same; only float32 summation order
differs (two half-batch gradients summed by the all-reduce instead of one sum over 8 samples,
DeepSpeed's flattened buckets, FSDP2's reduce-scatter), about 1e-7 relative per operation;
Adam then amplifies it where gradients are near zero. A real difference is far larger: with
the balance loss computed per rank instead of over the global batch, the adapters differed by
6e-3 after 6 steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_mole.train.checkpoints import checkpoint_problem
from llava_mole.train.config import load_train_config
from llava_mole.train.run import train
from tests.train.test_train import base_overrides, logged_losses

pytestmark = pytest.mark.slow  # end to end; `-m 'not slow'` leaves it out

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
STEPS = 4
LOSS_REL = 1e-5
ADAPTER_ATOL = 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(world, out, adapter: str, per_device: int, *extra: str) -> list[str]:
    return base_overrides(world, out) + [
        f"adapter.type={adapter}",
        "adapter.dropout=0.0",  # dropout masks are drawn per process
        f"train.max_steps={STEPS}",
        "train.save_steps=2",
        f"train.per_device_batch_size={per_device}",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory):
    """One process, batch 8: the run every multi-process run must reproduce (in-process)."""
    runs: dict[str, Path] = {}

    def get(adapter: str) -> Path:
        if adapter not in runs:
            out = tmp_path_factory.mktemp(f"reference-{adapter}")
            result = train(load_train_config(None, overrides(tiny_world, out, adapter, 8)))
            assert result.completed
            runs[adapter] = out
        return runs[adapter]

    return get


def environment(tmp_path: Path, request) -> dict[str, str]:
    # Any op DeepSpeed compiles is cached across tests and sessions (none is built on CPU:
    # see distributed.prepare_deepspeed); without pytest's cache, under the test's folder.
    cache = getattr(request.config, "cache", None)
    extensions = cache.mkdir("torch_extensions") if cache else tmp_path / "torch_extensions"
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # src/ too: a GPU session runs the repo without installing it.
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
        "TORCH_EXTENSIONS_DIR": str(extensions),
    }


def launch_args(world, out, adapter, *extra, nproc=2, node=None, port=None) -> list[str]:
    """``torchrun ... -m llava_mole.cli train`` with the test's settings."""
    port = port or free_port()
    if node is None:
        where = ["--nproc_per_node", str(nproc), "--master_port", str(port)]
    else:  # one of two "nodes" on this machine, one process each
        where = ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"]
        where += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    sets = [arg for item in overrides(world, out, adapter, 4, *extra) for arg in ("--set", item)]
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        "-m",
        "llava_mole.cli",
        "train",
        str(config),
        *sets,
    ]


def run_torchrun(args, env, cwd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_matches(reference: Path, run: Path) -> None:
    """Same per-step losses, balance loss and expert loads; same adapter, in full."""
    la, lb = logged_losses(reference), logged_losses(run)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    records = {}
    for folder in (reference, run):
        lines = (folder / "logs.jsonl").read_text().splitlines()
        records[folder] = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=LOSS_REL), step
        ra, rb = records[reference][step], records[run][step]
        for key in ra:
            if key.startswith(("lm_loss", "balance_loss", "domain_loss/")):
                assert rb[key] == pytest.approx(ra[key], rel=LOSS_REL), (step, key)
            if key.startswith("expert_load/"):  # logged with 4 decimals
                assert rb[key] == pytest.approx(ra[key], abs=1.5e-4), (step, key)
    a = load_file(str(reference / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert b[key].shape == a[key].shape and b[key].numel() > 0, key
        assert torch.allclose(a[key], b[key], atol=ADAPTER_ATOL, rtol=0), (
            key,
            (a[key] - b[key]).abs().max().item(),
        )


def assert_trained_between_checkpoints(run: Path, adapter: str) -> None:
    """Routers (MoLE) and the projector moved from step 2 to the end (the engine stepped them)."""
    early = load_file(str(run / "checkpoint-2" / "adapter_model.safetensors"))
    final = load_file(str(run / "adapter_model.safetensors"))
    kinds = ["multi_modal_projector"] + (["router"] if adapter == "mole" else [])
    for kind in kinds:
        names = [n for n in final if kind in n]
        assert names, kind
        moved = max((final[n] - early[n]).abs().max().item() for n in names)
        assert moved > 1e-6, kind


def assert_sharding(run: Path, engine: str, params: float, optimizer: float) -> None:
    report = json.loads((run / "summary.json").read_text())["distributed"]
    assert report["engine"] == engine and report["world_size"] == 2
    total = report["trainable_parameters"]
    for held, share in (
        (report["parameters_per_rank"], params),
        (report["optimizer_state_per_rank"], optimizer),
    ):
        assert len(held) == 2
        for value in held:
            assert value / total == pytest.approx(share, abs=0.02), report


def done_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("done: ")]


# ---- runs ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_world, reference, tmp_path, request):
    """Plain LoRA under DDP (no engine): the baseline path every engine is compared with."""
    out = tmp_path / "ddp"
    env = environment(tmp_path, request)
    proc = run_torchrun(launch_args(tiny_world, out, "lora"), env, tmp_path)
    assert len(done_lines(proc.stdout)) == 1  # rank 0 only
    assert_matches(reference("lora"), out)
    assert_sharding(out, "ddp", params=1.0, optimizer=1.0)


@pytest.mark.slow
def test_two_nodes_deepspeed_zero2_match_one_process(tiny_world, reference, tmp_path, request):
    """Two torchrun "nodes" on 127.0.0.1 (one process each), DeepSpeed ZeRO-2, MoLE."""
    out = tmp_path / "zero2"
    env = environment(tmp_path, request)
    port = free_port()
    zero2 = f"train.deepspeed={CONFIGS / 'deepspeed-zero2.json'}"
    nodes = [
        subprocess.Popen(
            launch_args(tiny_world, out, "mole", zero2, node=rank, port=port),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    # `done` once, from global rank 0 (node 0), after the files exist.
    assert len(done_lines(outputs[0][0])) == 1 and not done_lines(outputs[1][0])
    assert_matches(reference("mole"), out)
    assert_trained_between_checkpoints(out, "mole")
    # ZeRO-2: full parameters on each rank, the optimizer state split in two.
    assert_sharding(out, "deepspeed-zero2", params=1.0, optimizer=0.5)
    for step in (2, 4):
        assert checkpoint_problem(out / f"checkpoint-{step}") is None
        assert (out / f"checkpoint-{step}" / "latest").read_text().strip() == f"global_step{step}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, adapter, resume",
    [
        ("deepspeed-zero3", "mole", True),
        ("deepspeed-zero3", "lora", False),
        ("fsdp2", "mole", True),
    ],
)
def test_sharded_engines_match_one_process(
    tiny_world, reference, tmp_path, request, engine, adapter, resume
):
    """ZeRO-3 and FSDP2 shard the parameters themselves; a run stopped at step 2 and resumed
    ends with the uninterrupted one-process adapter, saved in full."""
    out = tmp_path / engine
    env = environment(tmp_path, request)
    if engine == "fsdp2":
        settings = ["train.fsdp=full_shard", f"train.fsdp_config={CONFIGS / 'fsdp.json'}"]
    else:
        settings = [f"train.deepspeed={CONFIGS / 'deepspeed-zero3.json'}"]
    if resume:
        first = run_torchrun(
            launch_args(tiny_world, out, adapter, *settings, "train.stop_after_steps=2"),
            env,
            tmp_path,
        )
        assert "stopped after step 2" in first.stdout and not done_lines(first.stdout)
        assert not (out / "adapter_model.safetensors").exists()
        assert not (out / "summary.json").exists()
        assert checkpoint_problem(out / "checkpoint-2") is None
    proc = run_torchrun(launch_args(tiny_world, out, adapter, *settings), env, tmp_path)
    if resume:
        assert "from checkpoint-2" in proc.stdout
    assert len(done_lines(proc.stdout)) == 1
    if engine == "fsdp2":
        assert "llava-mole applies fully_shard itself" in proc.stdout  # never a silent DDP
    assert_matches(reference(adapter), out)
    assert_trained_between_checkpoints(out, adapter)
    assert_sharding(out, engine, params=0.5, optimizer=0.5)
    assert checkpoint_problem(out / f"checkpoint-{STEPS}") is None


@pytest.mark.slow
def test_a_hanging_rank_fails_the_run_with_one_line(tiny_world, tmp_path, request):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0's next collective times out after
    train.dist_timeout and the run fails with one line; nothing claims success."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "hang"
    env = environment(tmp_path, request)
    args = launch_args(tiny_world, out, "mole", "train.max_steps=400", "train.dist_timeout=5")
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as so, stderr.open("w") as se:
        proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=so, stderr=se)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_logged_steps(out)) < 2:
            assert proc.poll() is None, stderr.read_text()[-3000:]
            time.sleep(0.2)
        assert len(_logged_steps(out)) >= 2, "training did not start"
        workers = psutil.Process(proc.pid).children(recursive=True)
        rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "llava-mole train: error:" not in stderr.read_text():
            time.sleep(0.2)
        for worker in rank1:  # torchrun would wait 30 s for a stopped rank to take SIGTERM
            worker.kill()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [
        line for line in stderr.read_text().splitlines() if "llava-mole train: error:" in line
    ]
    assert proc.returncode != 0
    assert len(errors) == 1, stderr.read_text()[-3000:]
    assert "rank 0: a collective operation failed" in errors[0], errors[0]
    assert "train.dist_timeout" in errors[0]
    assert not done_lines(stdout.read_text())
    assert not (out / "summary.json").exists()


def _logged_steps(out: Path) -> list[int]:
    path = out / "logs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


# ---- in-process -----------------------------------------------------------------------------


@pytest.mark.parametrize("balance_loss", ["switch", "official"])
def test_global_routing_terms_equal_one_process(balance_loss):
    """Two half-batches whose routing counts are summed (what the all-reduce does) give the
    balance loss, z-loss and loads of the whole batch, and gradients that average to the
    whole batch's; with padding, so tokens are weighted by count, not by rank."""
    from llava_mole import MoLEConfig, apply_mole
    from llava_mole.adapters.state import mole_aux_terms
    from tests.tiny_models import build_llava, llava_batch

    model = build_llava()
    config = MoLEConfig(rank=4, num_experts=3, router_z_coef=1e-3, balance_loss=balance_loss)
    apply_mole(model, config)
    batch = llava_batch(batch=4, pad_last=5)
    batch.pop("labels")
    routers = [p for n, p in model.named_parameters() if "router" in n]

    def run(inputs, sync=None, world=1):
        model.zero_grad()
        model(**inputs)
        terms = mole_aux_terms(model, sync, world)
        terms.loss.backward()
        return terms, [p.grad.clone() for p in routers]

    whole, whole_grads = run(batch)
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    stats: list[torch.Tensor] = []

    def record(t):
        stats.append(t.clone())
        return t

    for half in halves:  # pass 1: each half's counts
        run(half, sync=record, world=2)
    total = stats[0] + stats[1]
    results = [run(half, sync=lambda t: total, world=2) for half in halves]
    for terms, _ in results:
        assert terms.loss.item() == pytest.approx(whole.loss.item(), rel=1e-6)
        assert terms.balance.item() == pytest.approx(whole.balance.item(), rel=1e-6)
        assert torch.allclose(terms.load, whole.load, atol=1e-6)
    for a, b, w in zip(results[0][1], results[1][1], whole_grads):
        assert torch.allclose((a + b) / 2, w, atol=1e-7, rtol=1e-5)


def test_mole_trains_in_a_module_cast_to_bf16():
    """DeepSpeed bf16 casts the whole module, routers included (its float32 masters live in the
    optimizer): the router still computes float32 logits, and gradients reach every trainable
    tensor. Before, the float32 router product failed on the bf16 weight at the first step."""
    from llava_mole import MoLEConfig, apply_mole, mole_aux_loss
    from tests.tiny_models import build_llava, llava_batch, randomize_adapter

    model = build_llava()
    apply_mole(model, MoLEConfig(rank=4, num_experts=3))
    randomize_adapter(model)  # non-zero experts: the LM loss reaches the routers too
    model.to(torch.bfloat16).train()
    out = model(**llava_batch(batch=2))
    (out.loss + mole_aux_loss(model)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    routers = [p for n, p in trainable.items() if "router" in n]
    assert routers and all(p.dtype == torch.bfloat16 for p in routers)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for p in routers)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["adapter.dispatch=triton"], "adapter.dispatch: 'triton' runs forward-only kernels"),
        (
            ["train.deepspeed={zero2}", "train.fsdp=full_shard"],
            "train.deepspeed and train.fsdp: choose one engine",
        ),
        (["train.fsdp_config={fsdp}"], "train.fsdp_config: set train.fsdp"),
        (["train.fsdp=full_shard"], "train.fsdp: needs 2 or more processes"),
        (["train.fsdp=hybrid_shard"], "train.fsdp: unknown option 'hybrid_shard'"),
        (
            ["train.fsdp=full_shard", "train.fsdp_config={fsdp1}"],
            "train.fsdp_config: version 1 is not supported",
        ),
        (["train.deepspeed={zero2}"], "DeepSpeed needs a launcher"),
        (["train.deepspeed={optimizer}"], "has an 'optimizer' section"),
        (
            ["train.deepspeed={zero2}", "train.nan_policy=skip"],
            "'skip' does not work with DeepSpeed",
        ),
        (["train.deepspeed={offload}"], "offload_optimizer needs DeepSpeed's CPU Adam"),
        (["train.deepspeed={missing}"], "train.deepspeed: cannot read"),
        (["train.dist_timeout=0"], "train.dist_timeout: must be > 0"),
    ],
)
def test_unsupported_combinations_are_one_line(
    tiny_world, tmp_path, capsys, monkeypatch, settings, message
):
    """Refused before any model is loaded: exit 2, one line naming the setting."""
    from llava_mole.cli import main

    if message != "DeepSpeed needs a launcher":
        monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun with one process

    files = {
        "zero2": CONFIGS / "deepspeed-zero2.json",
        "fsdp": CONFIGS / "fsdp.json",
        "missing": tmp_path / "nope.json",
    }
    for name, content in {
        "fsdp1": {"version": 1},
        "optimizer": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
        "offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
    }.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(content))
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    items = overrides(tiny_world, tmp_path / "run", "mole", 4) + [
        s.format(**{k: str(v) for k, v in files.items()}) for s in settings
    ]
    code = main(["train", str(config), *[a for item in items for a in ("--set", item)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0].startswith("llava-mole train: error: ") and message in err[0], err
    assert not (tmp_path / "run" / "run_config.yaml").exists()  # nothing started


def test_fsdp_wrap_class_must_exist_in_the_model(tiny_world, tmp_path):
    from llava_mole.models.loading import load_model_and_processor
    from llava_mole.train.config import ConfigError
    from llava_mole.train.engines import check_model

    bad = tmp_path / "fsdp.json"
    bad.write_text(json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}))
    config = load_train_config(
        None,
        overrides(tiny_world, tmp_path, "mole", 4)
        + ["train.fsdp=full_shard", f"train.fsdp_config={bad}"],
    )
    model, _ = load_model_and_processor(str(tiny_world["model"]), "float32")
    with pytest.raises(ConfigError, match="'Qwen2DecoderLayer' is not a module class"):
        check_model(config, model)
    config.train.fsdp_config = str(CONFIGS / "fsdp.json")
    check_model(config, model)  # LlamaDecoderLayer is


def test_train_command_ends_the_process_group(tmp_path):
    """Left to interpreter teardown, gloo's threads can abort a finished rank with SIGABRT
    (pytorch/pytorch#190489; seen once in CI after a run had saved its adapter)."""
    import torch.distributed as dist

    from llava_mole.cli import _close_process_group

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    _close_process_group()
    assert not dist.is_initialized()
    _close_process_group()  # without a group: nothing to do
