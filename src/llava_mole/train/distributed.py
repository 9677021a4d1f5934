"""Several processes for ``llava-mole train``: DDP, DeepSpeed ZeRO-2/3 and FSDP2 (``fully_shard``).

What this module keeps true, whatever the engine (tested in ``tests/train/test_distributed.py``
with real 2-process runs on CPU):

* **Refusals first.** Unsupported combinations are one :class:`ConfigError` line before a model
  is loaded (:func:`.engines.check_engines`) or, for what needs the model, before training starts.
* **No silent fallback.** accelerate enables FSDP only for accelerator devices: on a CPU process
  group it would quietly run DDP. Here FSDP2 is then turned on for the CPU group (torch's
  ``fully_shard`` works with gloo), and an engine that was asked for but is not active is an
  error (:func:`enable_engine`). Each run logs how much of the trainable parameters and of their
  optimizer state every rank holds (:func:`shard_report`) and keeps it in ``summary.json``.
* **MoLE blocks are FSDP units** (router, experts and the frozen base MLP together), sharded on
  a dimension that splits evenly: dim 0 of an expert tensor is ``K`` (3 experts over 2 or 16
  ranks would leave most ranks holding padding).
* **Full adapter tensors at save**: gathered from the engine (:func:`gathered_adapter_tensors`:
  DeepSpeed's fp32 master copies, FSDP2's ``full_tensor``), never the empty ZeRO-3 partitions,
  and never the whole frozen base (only the trainable tensors travel).
* **Global-batch routing terms**: the balance loss and expert loads come from the counts of all
  processes (:func:`aux_sync`, see :func:`llava_mole.adapters.state.mole_aux_terms`).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from ..adapters.inject import adapter_info, unwrap
from ..adapters.mole import MoLEMLP
from .config import ConfigError, TrainConfig

logger = logging.getLogger("llava_mole.train")


def world_size() -> int:
    """Processes of this launch (torchrun's ``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def global_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


# ---- process group and engines ------------------------------------------------------------------


def init_process_group(timeout_s: float) -> None:
    """Start a CPU (gloo) process group under torchrun with ``timeout_s`` for every collective.

    accelerate starts the CPU group without a timeout argument (gloo's default, 30 minutes); with
    the group started here, a rank that fails or hangs stops the others after ``timeout_s``.
    On GPUs the Trainer's ``ddp_timeout`` reaches the NCCL group; nothing is done here.
    """
    import torch.distributed as dist

    if world_size() < 2 or torch.cuda.is_available() or not dist.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def prepare_deepspeed(config: TrainConfig) -> None:
    """DeepSpeed on CPU: skip the shared-memory all-reduce op.

    DeepSpeed's CPU accelerator JIT-compiles ``deepspeed_shm_comm`` when its process group
    starts (about 2 minutes on 2 cores); only tensor-parallel inference uses it
    (``inference_all_reduce``), ZeRO training goes through torch.distributed.
    """
    if not config.train.deepspeed or torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def enable_engine(trainer) -> None:
    """After the Trainer made its accelerator: the engine asked for is active, or one error line.

    FSDP on a CPU process group: accelerate (1.15) enables FSDP only for accelerator devices and
    would run DDP; FSDP2 is turned on here (torch's ``fully_shard`` supports gloo).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from ._hf_compat import set_shared_distributed_type

    args = trainer.args
    state = trainer.accelerator.state
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise ConfigError(
            f"train.deepspeed: DeepSpeed is not active in this launch ({state.distributed_type}); "
            "launch with torchrun or accelerate launch"
        )
    wants_fsdp = args.fsdp_plugin_args is not None
    if wants_fsdp and not trainer.is_fsdp_enabled:
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise ConfigError(
                f"train.fsdp: FSDP is unavailable on this device (accelerate chose "
                f"{state.distributed_type}, not FSDP)"
            )
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        if plugin.fsdp_version != 2:
            raise ConfigError("train.fsdp_config: only FSDP2 (version 2) is supported")
        if state.mixed_precision != "no":  # as accelerate does for its FSDP state
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        set_shared_distributed_type(DistributedType.FSDP)
        trainer.is_fsdp_enabled = True
        if global_rank() == 0:
            print(
                "FSDP2 on CPU processes (gloo): accelerate enables FSDP for accelerator devices "
                "only, so llava-mole applies fully_shard itself",
                flush=True,
            )


def _even_shard_dim(param: nn.Parameter, world: int) -> int:
    """Dim 0 when it splits evenly over ``world`` ranks, else the largest dim that does (else
    the largest dim): an expert tensor's dim 0 is ``K``."""
    shape = list(param.shape)
    if not shape:
        return 0
    order = [0] + sorted(range(1, len(shape)), key=lambda d: -shape[d])
    for dim in order:
        if shape[dim] % world == 0 and shape[dim] >= world:
            return dim
    return max(range(len(shape)), key=lambda d: shape[d])


def shard_mole_blocks(trainer, model: nn.Module) -> int:
    """``fully_shard`` each :class:`MoLEMLP` as one FSDP2 unit (router, experts, base MLP),
    with the plugin's precision/offload settings and evenly splitting shard dims.

    Runs before the optimizer is made; accelerate then wraps the decoder layers and the root
    (modules already sharded are left as they are). Returns the number of blocks sharded.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    plugin = trainer.accelerator.state.fsdp_plugin
    world = trainer.accelerator.num_processes
    blocks = [
        m for m in model.modules() if isinstance(m, MoLEMLP) and not isinstance(m, FSDPModule)
    ]
    for block in blocks:
        fully_shard(
            block,
            reshard_after_forward=plugin.reshard_after_forward,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            offload_policy=plugin.cpu_offload,
            shard_placement_fn=lambda p: Shard(_even_shard_dim(p, world)),
        )
    return len(blocks)


# ---- what each rank holds, what is saved --------------------------------------------------------


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    inner = unwrap(model)
    info = adapter_info(inner)
    params = dict(inner.named_parameters())
    names = (
        info.trainable if info is not None else [n for n, p in params.items() if p.requires_grad]
    )
    return [(n, params[n]) for n in names]


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter (a ZeRO-3 partition or an FSDP2 shard counts in full)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def local_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` this process stores."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().numel()
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is not None:
        return ds_tensor.numel()
    return param.numel()


def trainable_numel(model: nn.Module) -> int:
    return sum(full_numel(p) for _, p in _named_trainable(model))


def _deepspeed_optimizer_numel(trainer) -> int | None:
    optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        groups = getattr(optimizer, attr, None)
        if groups:
            return int(sum(t.numel() for t in groups))
    return None


def shard_report(trainer) -> dict[str, Any]:
    """How much of the trainable parameters and optimizer state each rank holds (a collective).

    Rank 0 prints one line; the dict goes to ``summary.json`` (``distributed``).
    """
    import torch.distributed as dist

    named = _named_trainable(trainer.model)
    total = sum(full_numel(p) for _, p in named)
    params = sum(local_numel(p) for _, p in named)
    optim = _deepspeed_optimizer_numel(trainer) if trainer.is_deepspeed_enabled else None
    optim = params if optim is None else optim
    world = trainer.accelerator.num_processes
    mine = torch.tensor([float(params), float(optim)], device=trainer.args.device)
    if world > 1 and dist.is_initialized():
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
    else:
        gathered = [mine]
    per_rank = [[int(v) for v in t.tolist()] for t in gathered]
    if trainer.is_deepspeed_enabled:
        engine = f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    elif trainer.is_fsdp_enabled:
        engine = "fsdp2"
    else:
        engine = "ddp" if world > 1 else "single"
    report = {
        "engine": engine,
        "world_size": world,
        "trainable_parameters": total,
        "parameters_per_rank": [p for p, _ in per_rank],
        "optimizer_state_per_rank": [o for _, o in per_rank],
    }
    if trainer.is_world_process_zero():

        def shares(values: list[int]) -> str:
            return " / ".join(f"{v / max(total, 1):.1%}" for v in values)

        print(
            f"{engine}, {world} process(es): each rank holds {shares(report['parameters_per_rank'])} "
            f"of the {total:,} trainable parameters and {shares(report['optimizer_state_per_rank'])} "
            "of their optimizer state",
            flush=True,
        )
    return report


def gathered_adapter_tensors(trainer) -> dict[str, torch.Tensor]:
    """Every trainable tensor in full, float32 master values, on the CPU (a collective: call it
    on every rank; under ZeRO-3 and FSDP2 each rank contributes its shard).

    ZeRO-1/2/3: DeepSpeed's fp32 master copy (``safe_get_full_fp32_param``; the module's copy
    is bf16 under bf16 training and empty under ZeRO-3). FSDP2: ``DTensor.full_tensor()``.
    """
    from torch.distributed.tensor import DTensor

    get_fp32 = None
    if trainer.is_deepspeed_enabled:
        from deepspeed.utils import safe_get_full_fp32_param as get_fp32
    out: dict[str, torch.Tensor] = {}
    for name, param in _named_trainable(trainer.model):
        value = None
        if isinstance(param, DTensor):
            value = param.full_tensor()
        elif get_fp32 is not None:
            value = get_fp32(param)
        if value is None:
            value = param
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out


def aux_sync(trainer):
    """The all-reduce that makes the MoLE routing terms global, or ``None`` (one process)."""
    import torch.distributed as dist

    if trainer.accelerator.num_processes < 2 or not dist.is_initialized():
        return None

    def total(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor)
        return tensor

    return total


def all_ranks_true(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; for per-shard checks)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


# ---- failures -----------------------------------------------------------------------------------

_COLLECTIVE_MARKERS = (
    "timed out",
    "timeout",
    "monitoredbarrier",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
)


def collective_failure(err: BaseException) -> str | None:
    """One line for a collective that timed out or lost a peer, else ``None``."""
    try:
        from torch.distributed import DistBackendError
    except ImportError:  # pragma: no cover
        DistBackendError = RuntimeError  # noqa: N806
    text = str(err).strip()
    lowered = text.lower()
    if not isinstance(err, (DistBackendError, RuntimeError)) or not any(
        m in lowered for m in _COLLECTIVE_MARKERS
    ):
        return None
    first = text.splitlines()[0] if text else type(err).__name__
    if first.startswith("[") and "] " in first:
        first = first.split("] ", 1)[1]  # drop gloo's source-file prefix
    return (
        f"rank {global_rank()}: a collective operation failed ({first[:200]}): another process "
        "failed or stopped responding (train.dist_timeout sets how long a rank waits); see the "
        "other ranks' output"
    )


def close_process_group() -> None:
    """Every rank waits here for the others (the run's collective timeout), then the group ends.

    On gloo this is a ``monitored_barrier``: a rank that does not arrive is named.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        dist.monitored_barrier(wait_all_ranks=True)
    else:
        dist.barrier()
    dist.destroy_process_group()
