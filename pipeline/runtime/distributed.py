"""Devices, precision and torch.distributed: the one place that decides them.

Why one module: the device "auto", the rank a process is, which tasks or videos it owns and how
values cross processes were decided in several places, and a fix reached one of them (NCCL moves
CUDA tensors only, so a collective built on the CPU fails the first multi-GPU run). Here every
collective takes the training device and builds its tensors there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_MODES = ("bf16", "fp16", "off")  # training autocast (finetune's --amp)


# How long a collective waits for the slowest rank before the run fails instead of hanging: long
# enough for rank 0 to extract its share or validate alone, and still finite.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


class DeviceError(ValueError):
    """A device that is not a torch device, or one this machine does not have; the message says which."""


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda when present, else cpu; under torchrun a bare "cuda" is this rank's GPU (LOCAL_RANK)."""
    name = (name or "auto").strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None and world_size() > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        elif device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU (bfloat16 is about 10x slower there); on CUDA bf16 where the GPU has it, else fp16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_dtype(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype: None on CPU or with amp off.

    True (train-heads' switch, which has no --amp) is the GPU's best: bf16, else fp16, which the
    loop's GradScaler makes safe. A string is finetune's --amp, kept as asked.
    """
    if isinstance(amp, bool):
        amp = resolve_precision("auto", device) if amp and device.type == "cuda" else "off"
    if amp not in AMP_MODES:
        raise ValueError(f"amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} has no bfloat16: use --amp fp16 (or off)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (the training default there); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------- ranks


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """The world torchrun launched (WORLD_SIZE) before or after the group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", timeout: timedelta = COLLECTIVE_TIMEOUT) -> tuple[int, int]:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); -> (rank, world).

    Every collective then waits at most `timeout` for the slowest rank (NCCL's default is minutes:
    too short for rank 0 validating a large split alone while the others wait in a broadcast)."""
    if dist.is_initialized():
        return rank_world()
    if world_size() <= 1:
        return 0, 1
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return rank_world()


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: every world-th item from position rank (the same on every run)."""
    rank, world = rank_world()
    return [item for k, item in enumerate(items) if k % world == rank]


# ---------------------------------------------------------------------------------------------- collectives


def _collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensors live: the training device (NCCL moves CUDA tensors only)."""
    return device if device.type == "cuda" else torch.device("cpu")


def broadcast_values(values: Sequence[float], device: torch.device, src: int = 0) -> list[float]:
    """Rank `src`'s numbers on every rank (float64, built on the device)."""
    if world_size() == 1 or not dist.is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device(device))
    dist.broadcast(tensor, src)
    return tensor.tolist()


def sum_values(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums over every rank (float64, built on the device)."""
    if world_size() == 1 or not dist.is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any, device: torch.device, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (its bytes travel on the device)."""
    if world_size() == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device(device))
    return box[0]


def barrier(device: torch.device) -> None:
    """Wait for every rank (on CUDA, on this rank's GPU)."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" and device.index is not None else None)
