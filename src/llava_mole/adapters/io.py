"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (no pickle).

The safetensors file holds every trained tensor (attention LoRA, routers, experts, and the
projector when it is trained), keyed by parameter name in the adapted model. Writes are atomic:
a temporary name in the target directory, fsync, rename.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .card import CARD_NAME, SCORES_KEY, render_model_card
from .config import RUNTIME_FIELDS, MoLEConfig
from .inject import AdapterError, adapter_info, apply_mole, unwrap

logger = logging.getLogger("llava_mole")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "llava-mole-adapter"
FORMAT_VERSION = 1
# PEFT reads ``peft_type`` first and fails with a KeyError naming its value when it has no such
# method; PEFT 0.21's ``register_peft_method`` only accepts names of its closed ``PeftType``
# enum, so a MoLE method cannot be registered from outside. The value is therefore the one-line
# explanation a PEFT user then sees.
PEFT_TYPE_MARKER = (
    "LLAVA_MOLE (not a PEFT adapter: load it with llava_mole.load_adapter(model, folder); "
    "`llava-mole export-peft` converts plain-LoRA adapters to PEFT)"
)


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` with the mode a plain ``open`` would give (umask).

    ``mkstemp`` creates files 0600 whatever the umask, so a teammate or a serving process
    under another user could not read the adapters, reports and checkpoints written here.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _file_mode())
    return fd, tmp


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """``safetensors`` save through a temporary file in the same directory, then rename."""
    path = Path(path)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _file_mode())  # safetensors writes a new file, 0600 like mkstemp's
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk; best effort where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor of an adapted model, detached, on CPU, contiguous."""
    info = adapter_info(model)
    if info is None:
        raise AdapterError("the model has no llava-mole adapter (call apply_mole first)")
    params = dict(unwrap(model).named_parameters())
    return {name: params[name].detach().to("cpu").contiguous() for name in info.trainable}


def _base_model_summary(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    extra: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed).

    Args:
        model: a model adapted with :func:`apply_mole` (DDP-wrapped is fine).
        directory: output folder.
        extra: optional JSON-ready metadata stored in the config under ``"extra"``.
        tensors: the trained tensors in full, when the model's own are sharded (DeepSpeed
            ZeRO-3, FSDP2: gathered by the trainer); by default read from the model.

    Returns:
        The directory path.
    """
    info = adapter_info(model)
    if info is None:
        raise AdapterError("save_adapter: the model has no llava-mole adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = adapter_state_dict(model)
    elif sorted(tensors) != sorted(info.trainable):
        raise AdapterError("save_adapter: the tensors given are not the adapter's trained tensors")
    atomic_save_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peft_type": PEFT_TYPE_MARKER,
        "mole": info.config.to_dict(),
        "target_tree": info.target_tree,
        "projector_modules": info.projector_modules,
        "base_model": _base_model_summary(unwrap(model)),
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
    }
    if extra:
        payload["extra"] = extra
    _write_config(directory, payload)
    return directory


def _write_config(directory: Path, payload: dict[str, Any]) -> None:
    """``adapter_config.json`` and the model card built from it."""
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write_bytes(directory / CARD_NAME, render_model_card(payload).encode())


def record_evaluation(directory: str | os.PathLike, split: str, per_domain: dict) -> None:
    """Store per-domain scores with the adapter (``extra.evaluation``) and in its model card.

    Args:
        directory: an adapter folder.
        split: the evaluated split.
        per_domain: ``{domain: {"metric", "n", "score"}}``.
    """
    directory = Path(directory)
    _, payload = read_adapter_config(directory)
    extra = dict(payload.get("extra") or {})
    rows = {d: {k: r[k] for k in ("metric", "n", "score")} for d, r in per_domain.items()}
    extra[SCORES_KEY] = {"split": split, "per_domain": rows}
    payload["extra"] = extra
    _write_config(directory, payload)


def read_adapter_config(directory: str | os.PathLike) -> tuple[MoLEConfig, dict[str, Any]]:
    """Parse ``adapter_config.json``; one clear error for a missing or malformed file."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterError(f"adapter directory not found: {directory}")
    if not path.is_file():
        raise AdapterError(f"{path}: missing (not a llava-mole adapter directory)")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a llava-mole adapter config (missing format={FORMAT!r})")
    version = payload.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterError(f"{path}: format_version must be an integer (got {version!r})")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version} is newer than this llava-mole")
    if not isinstance(payload.get("mole", {}), dict) or not isinstance(
        payload.get("extra") or {}, dict
    ):
        raise AdapterError(f"{path}: 'mole' and 'extra' must be mappings")
    try:
        config = MoLEConfig.from_dict(payload.get("mole", {}))
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{path}: {err}") from None
    return config, payload


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter's tensors; each must be floating point and finite (one line otherwise)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path}: unreadable safetensors file ({err})") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(
                f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}; "
                "adapter tensors must be floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{path}: tensor {name!r} holds NaN or Inf values")
    return tensors


def _config_mismatch(saved: MoLEConfig, current: MoLEConfig) -> str | None:
    a, b = saved.to_dict(), current.to_dict()
    for key in sorted(set(a) | set(b)):
        if key in RUNTIME_FIELDS or key == "extra":
            continue
        if a.get(key) != b.get(key):
            return f"{key}: adapter has {a.get(key)!r}, model has {b.get(key)!r}"
    return None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter directory into ``model``.

    A model without adapter gets one first (``apply_mole`` with the saved config). A model that
    already has one must have the same config (runtime fields such as ``dispatch`` aside).

    Raises:
        AdapterError: naming the first config field or tensor that does not fit.
    """
    config, _ = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)  # checked before the model is touched
    info = adapter_info(model)
    if info is None:
        apply_mole(model, config)
        info = adapter_info(model)
    else:
        problem = _config_mismatch(config, info.config)
        if problem:
            raise AdapterError(f"{directory}: adapter config does not match the model ({problem})")
    params = dict(unwrap(model).named_parameters())
    for name in info.trainable:
        if name not in tensors:
            raise AdapterError(f"{directory}: tensor {name!r} expected by the model is missing")
        if tuple(tensors[name].shape) != tuple(params[name].shape):
            raise AdapterError(
                f"{directory}: tensor {name!r} has shape {tuple(tensors[name].shape)} in the "
                f"adapter but {tuple(params[name].shape)} in the model"
            )
    unexpected = sorted(set(tensors) - set(info.trainable))
    if unexpected:
        raise AdapterError(
            f"{directory}: tensor {unexpected[0]!r} in the adapter has no place in the model"
        )
    cast = sorted(
        {(str(tensors[n].dtype), str(params[n].dtype)) for n in info.trainable}
        - {(str(params[n].dtype),) * 2 for n in info.trainable}
    )
    if cast:
        stored, used = (d.removeprefix("torch.") for d in cast[0])
        logger.warning(
            "note: %s: adapter tensors stored as %s are cast to %s", directory, stored, used
        )
    with torch.no_grad():
        for name in info.trainable:
            _copy_into(params[name], tensors[name])
    return model


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)``; an FSDP2-sharded parameter takes its own shard of ``value``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.dtype)
    if isinstance(param, DTensor):
        # Every rank read the same file: each keeps its shard, no communication.
        value = distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)
