"""``transformers.Trainer`` for MoLE / LoRA instruction tuning.

What it adds to the stock Trainer:

* **Loss**: token-level cross entropy computed here (so it is exact across gradient accumulation
  and DDP: sum over label tokens / label tokens of the whole optimizer step) plus the MoLE
  auxiliary loss of each micro-batch (``mole_aux_loss``), averaged over micro-batches.
* **Logging**: LM loss, balance loss, per-expert load and per-domain LM loss, reduced over
  processes at each logging step.
* **Checkpoints** (:mod:`.saving`): adapter-only (``save_adapter`` format) plus optimizer,
  scheduler and RNG state, written under a temporary name and renamed when complete, so a
  half-written checkpoint is never taken as the latest. Under DeepSpeed the optimizer state is
  its ``global_stepN/`` partitions (frozen base weights excluded), under FSDP2 ``optimizer.bin``.
* **Engines** (DeepSpeed ZeRO-2/3, FSDP2; see :mod:`.distributed`): the engine asked for is
  active or the run stops with one line, each rank's share of the trainable state is logged,
  and adapters are saved from the gathered full tensors.
* **Numerical faults**: a non-finite loss or gradient stops the run (or skips the step) with
  a message naming the step, before anything overwrites the last good checkpoint.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.inject import PROJECTOR_NAME, adapter_info
from ..adapters.observe import set_token_tags
from ..adapters.state import get_state, mole_aux_terms, set_routing_domains
from ..data.templates import IGNORE_INDEX
from . import distributed
from ._hf_compat import CompatTrainer
from .arguments import MoLETrainingArguments
from .callbacks import DenseRoutingWarmup
from .checkpoints import (
    pick_checkpoint,
)
from .guards import GradientGuard, NonFiniteLossError, _all_finite  # noqa: F401 (re-exported)
from .saving import CheckpointWriting

logger = logging.getLogger("llava_mole.train")


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-position next-token cross entropy in float32, zero where ignored.

    Args:
        logits: ``(B, T, V)``, or ``(B, P, V)`` at ``positions`` only.
        labels: ``(B, T)``.
        positions: the ``P`` positions the logits were kept at (``logits_to_keep``).

    Returns:
        ``(B, T-1)`` losses of predicting token ``t + 1`` at ``t``, or ``(B, P)`` at
        ``positions``.
    """
    if positions is None:
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
    else:
        shift_logits = logits.float()
        shift_labels = labels[:, 1:].index_select(1, positions)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return loss.view(shift_labels.shape)


class MoLETrainer(CheckpointWriting, CompatTrainer):
    """Trainer for models adapted with :func:`llava_mole.apply_mole`.

    The MoLE settings are read from ``args`` when it is a
    :class:`~.arguments.MoLETrainingArguments`; the keywords below override them.

    Args:
        domains: domain names of the training mixture (for per-domain logging).
        projector_lr: learning rate of the multimodal projector (``None``: the main one).
        router_lr: learning rate of the MoLE routers (``None``: the main one).
        router_dense_warmup: share of the optimizer steps, from the start, with dense routing
            (every expert, weighted by its router probability; :class:`.DenseRoutingWarmup`).
        nan_policy: ``"stop"`` or ``"skip"``.
        log_domain_loss: log the LM loss per domain.
        adapter_extra: metadata saved with every adapter (prompt format, training data).
        train_sampler: replaces the stock training sampler (e.g. length-grouped).
        **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        domains: list[str] | None = None,
        projector_lr: float | None = None,
        router_lr: float | None = None,
        router_dense_warmup: float | None = None,
        nan_policy: str | None = None,
        log_domain_loss: bool | None = None,
        adapter_extra: dict[str, Any] | None = None,
        train_sampler: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        own = self.args if isinstance(self.args, MoLETrainingArguments) else None

        def setting(value: Any, name: str, default: Any) -> Any:
            return value if value is not None else getattr(own, name, default)

        self.adapter_extra = adapter_extra
        self.train_sampler = train_sampler
        self.domains = list(domains or [])
        self.projector_lr = setting(projector_lr, "projector_lr", None)
        self.router_lr = setting(router_lr, "router_lr", None)
        self.router_dense_warmup = setting(router_dense_warmup, "router_dense_warmup", 0.0)
        self.nan_policy = setting(nan_policy, "nan_policy", "stop")
        self.log_domain_loss = setting(log_domain_loss, "log_domain_loss", True)
        self.loss_is_scaled_for_ga = True  # compute_loss normalises over the whole step
        self.skipped_steps: list[int] = []
        self.tokens_seen = 0
        self._reset_accumulators()
        self.add_callback(GradientGuard(self))
        self.add_callback(DenseRoutingWarmup(self.router_dense_warmup))
        self.shard_report: dict[str, Any] | None = None
        self._aux_sync = distributed.aux_sync(self)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        distributed.enable_engine(self)

    @property
    def uses_engine(self) -> bool:
        """DeepSpeed or FSDP (parameters, gradients or optimizer state sharded)."""
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def after_prepare(self) -> None:
        """Once the model is wrapped for training: each rank's share of the trainable state."""
        self.shard_report = distributed.shard_report(self)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """``6 * tokens * parameters`` (as transformers estimates it), the count cached.

        transformers recounts the model's parameters on every step; on a small model on CPU
        that was ~1 ms of a ~45 ms step.
        """
        name = getattr(self.model, "main_input_name", "input_ids")
        if name not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_flop_parameters", None) is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[name].numel() * self._flop_parameters

    def _takes_logits_to_keep(self, model: torch.nn.Module) -> bool:
        """Whether the model's ``forward`` accepts ``logits_to_keep`` (transformers' models do)."""
        if getattr(self, "_logits_to_keep", None) is None:
            forward = self.accelerator.unwrap_model(model).forward
            self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
        return self._logits_to_keep

    @staticmethod
    def _routes_by_domain(model: torch.nn.Module) -> bool:
        state = get_state(model)
        return state is not None and state.config.router == "domain"

    # ---- loss --------------------------------------------------------------------------------
    def _reset_accumulators(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._acc[name] = self._acc[name] + value if name in self._acc else value.clone()

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        labels = inputs.pop("labels")
        domain_ids = inputs.pop("domain_ids", None)
        set_token_tags(model, domain_ids, num_domains=max(len(self.domains), 1))
        if domain_ids is not None and self._routes_by_domain(model):
            set_routing_domains(model, [self.domains[i] for i in domain_ids.tolist()])
        positions = inputs.pop("loss_positions", None)
        if positions is not None and self._takes_logits_to_keep(model):
            # Logits only where the loss looks: on the demo's samples ~10% of the positions.
            outputs = model(**inputs, logits_to_keep=positions)
            token_loss = token_cross_entropy(outputs.logits, labels, positions)
            valid = (labels[:, 1:].index_select(1, positions) != IGNORE_INDEX).float()
        else:
            outputs = model(**inputs)
            token_loss = token_cross_entropy(outputs.logits, labels)
            valid = (labels[:, 1:] != IGNORE_INDEX).float()
        lm_sum = token_loss.sum()
        local_count = valid.sum()

        ga_steps = max(self.current_gradient_accumulation_steps, 1)
        world = self.accelerator.num_processes
        if num_items_in_batch is not None:
            # Global label count of the optimizer step; DDP averages gradients over processes,
            # so multiplying by the world size makes the result sum(CE) / global count.
            denominator = torch.as_tensor(num_items_in_batch, device=lm_sum.device).float()
            scale = world if self.args.average_tokens_across_devices else 1
            lm_loss = lm_sum / denominator.clamp_min(1) * scale
        else:
            lm_loss = lm_sum / local_count.clamp_min(1) / ga_steps
        loss = lm_loss
        # Balance loss and loads of the global micro-batch (all processes' tokens).
        terms = mole_aux_terms(model, self._aux_sync if model.training else None, world)
        if terms.loss is not None:
            loss = loss + terms.loss / ga_steps

        if model.training:
            self._record(
                inputs, labels, domain_ids, token_loss, valid, (lm_sum, local_count), terms
            )
        return (loss, outputs) if return_outputs else loss

    def _record(self, inputs, labels, domain_ids, token_loss, valid, sums, terms) -> None:
        """Add a training micro-batch's sums to what the next log line reports."""
        lm_sum, local_count = sums
        self._accumulate("lm_sum", lm_sum)
        self._accumulate("lm_count", local_count)
        self._accumulate("micro_batches", torch.ones((), device=lm_sum.device))
        # Kept on the device: int() here would synchronise host and device every step.
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(labels.numel())
        self.tokens_seen = self.tokens_seen + tokens.to(lm_sum.device).float()
        if terms.balance is not None:
            self._accumulate("balance_sum", terms.balance)
        if terms.load is not None:
            self._accumulate("load_sum", terms.load)
        if self.log_domain_loss and domain_ids is not None and self.domains:
            domains = domain_ids.to(lm_sum.device)
            per_sample = token_loss.sum(1).detach().float()
            counts = valid.sum(1)
            d = len(self.domains)
            self._accumulate(
                "domain_sum",
                torch.zeros(d, device=lm_sum.device).index_add(0, domains, per_sample),
            )
            self._accumulate(
                "domain_count",
                torch.zeros(d, device=lm_sum.device).index_add(0, domains, counts),
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            if self.nan_policy == "stop":
                raise NonFiniteLossError(self._nan_message("loss", step))
            logger.warning("non-finite loss at step %d: skipping the step", step)
            self._skip_pending = True
            return torch.zeros_like(loss)
        return loss

    def _nan_message(self, what: str, step: int) -> str:
        choice = pick_checkpoint(self.args.output_dir)
        if choice.path is not None:
            kept = (
                f"; the last good checkpoint {choice.path} is intact (verified: every file "
                "reads back, adapter finite)"
            )
        else:
            kept = "; no intact checkpoint was written yet"
        return (
            f"non-finite {what} (NaN/Inf) at step {step}: training stopped{kept} "
            "(lower train.learning_rate, or set train.nan_policy=skip)"
        )

    # ---- logging -----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._acc:
            acc = {
                k: self.accelerator.reduce(v.clone(), reduction="sum") for k, v in self._acc.items()
            }
            logs["lm_loss"] = round(float(acc["lm_sum"] / acc["lm_count"].clamp_min(1)), 6)
            if "balance_sum" in acc:
                logs["balance_loss"] = round(float(acc["balance_sum"] / acc["micro_batches"]), 6)
            if "load_sum" in acc:
                loads = (acc["load_sum"] / acc["micro_batches"]).tolist()
                for k, value in enumerate(loads):
                    logs[f"expert_load/{k}"] = round(value, 4)
            if "domain_sum" in acc:
                for name, total, count in zip(
                    self.domains, acc["domain_sum"].tolist(), acc["domain_count"].tolist()
                ):
                    if count > 0:
                        logs[f"domain_loss/{name}"] = round(total / count, 6)
            self._reset_accumulators()
        super().log(logs, start_time)

    # ---- optimizer ---------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if (
            self.optimizer is None
            and self.is_fsdp_enabled
            and not getattr(self, "_blocks_sharded", 0)
        ):
            # Before the optimizer holds the parameters (accelerate maps them to their shards).
            self._blocks_sharded = distributed.shard_mole_blocks(self, model or self.model) or -1
        if self.optimizer is None and (self.projector_lr is not None or self.router_lr is not None):
            model = model if model is not None else self.model
            own_lr = {"projector": self.projector_lr, "router": self.router_lr}
            groups: dict[str, list[torch.nn.Parameter]] = {"rest": [], **{k: [] for k in own_lr}}
            info = adapter_info(model)
            # The family's projector / connector / merger (Qwen2-VL's lives inside `visual`).
            projector = set(info.projector) if info is not None else set()
            for name, param in model.named_parameters():
                if param.requires_grad:
                    parts = name.split(".")
                    kind = "projector" if name in projector or PROJECTOR_NAME in parts else None
                    kind = kind or ("router" if "router" in parts else "rest")
                    groups[kind if own_lr.get(kind) is not None else "rest"].append(param)
            lrs = {"rest": self.args.learning_rate, **own_lr}
            self.optimizer = torch.optim.AdamW(
                [{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps],
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
            )
            return self.optimizer
        return super().create_optimizer(model)


def steps_for(num_samples: int, batch: int, accumulation: int, world: int, epochs: float) -> int:
    per_epoch = math.ceil(num_samples / (batch * world))
    return max(1, math.ceil(per_epoch * epochs / accumulation))
