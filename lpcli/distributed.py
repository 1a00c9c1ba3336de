"""Where the work runs: the device (``cpu``, ``cuda``, ``auto``) and, under ``torchrun``,
the process group of a data-parallel train-check.

Data parallelism here reproduces the single-process run rather than speeding up a big
one: every rank builds the same model from the same seed, takes its contiguous slice of
the same global batch, and the weight gradients are summed across ranks *inside* the
backward pass (a post-accumulate-grad hook registered before the simulator's), so the
weight-gradient quantizer and the optimizer see the global gradient, bit-identical on
every rank, and every rank applies the same update. Each rank's loss is scaled by its
share of the batch, so the errors arriving at each sample are those of the
single-process run and their quantization (and its counters) matches it too.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError

DEVICE_CHOICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"`` (``"cuda:N"``), or ``"auto"``: CUDA when there is one, else the CPU.

    Asking for CUDA where there is none is bad input (exit 2), not a traceback.
    """
    if device is None:
        device = "cpu"
    if isinstance(device, torch.device):
        text = str(device)
    else:
        text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(text)
    except (RuntimeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise InputError("command line", "--device", f"unknown device {device!r}; use one of "
                         f"{', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise InputError("command line", "--device", f"CUDA was asked for but {why} "
                             f"(torch {torch.__version__}); use --device cpu or --device auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError("command line", "--device", f"{text}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) visible")
    return resolved


def describe_device(device: torch.device, world: World | None = None) -> dict[str, Any]:
    """What the report says about where it ran: stable across runs on the same machine."""
    out: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
    out["processes"] = world.size if world is not None else 1
    if world is not None and world.size > 1:
        out["backend"] = world.backend
    return out


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """fp32 means fp32: no TF32 in CUDA matmuls and convolutions (cuDNN's default), and
    no autotuned algorithm choice, while a run is on the GPU. Restored afterwards."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved_flags = (cudnn.benchmark, cudnn.deterministic)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        saved = (torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        cudnn.conv.fp32_precision = "ieee"
    else:  # torch < 2.9
        saved = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        cudnn.allow_tf32 = False
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision = saved
        else:
            torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = saved
        cudnn.benchmark, cudnn.deterministic = saved_flags


# --- processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run (size 1: alone)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True except on the ranks > 0 of a ``torchrun`` launch: only the main process prints
    and writes. Reads the environment, so it answers before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def setup(device: str | torch.device | None = "cpu") -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (gloo on the CPU,
    nccl on CUDA, one GPU per local rank) and return this rank's place and device.

    Without ``WORLD_SIZE`` > 1 nothing is initialized: ``World()`` and the resolved device.
    Calling it again returns the existing group.
    """
    resolved = resolve_device(device)
    if world_size_from_env() <= 1:
        return World(), resolved
    import torch.distributed as dist

    if resolved.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise InputError("command line", "--device", f"local rank {local_rank} has no GPU of its own "
                             f"({torch.cuda.device_count()} visible); start at most that many processes per node")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_teardown)
    backend = str(dist.get_backend())
    if ("nccl" if resolved.type == "cuda" else "gloo") not in backend:
        raise InputError("command line", "--device", f"the process group uses {backend}, which does not "
                         f"serve tensors on {resolved.type}")
    return World(dist.get_rank(), dist.get_world_size(), backend), resolved


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        # Leave together: a process that closes its connections while a peer is still
        # writing its report makes the peer's gloo thread abort (SIGABRT) on the lost link.
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shard(index: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of indices (sizes differ by at most one)."""
    if not world.distributed:
        return index
    return torch.tensor_split(index, world.size)[world.rank]


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the plan, so that no rank trains another one)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_problem(where: tuple[str, str] | None, world: World, device: torch.device) -> tuple[str, str] | None:
    """Every rank stops at the same step: the lowest rank's non-finite finding, if any rank had one."""
    if not world.distributed:
        return where
    import torch.distributed as dist

    flag = torch.tensor([0 if where is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag):
        return None
    found: list[Any] = [None] * world.size
    dist.all_gather_object(found, where)
    return next(tuple(f) for f in found if f is not None)


class GradientSum:
    """Sum each parameter's gradient over the ranks as soon as backward has accumulated it.

    Attach it *before* anything else hooks the gradients (the simulator's weight-gradient
    quantizer, the non-finite watch): post-accumulate-grad hooks run in registration order,
    so those then see the global gradient. Every rank runs the same graph, so the hooks
    fire, and the collectives match, in the same order everywhere.
    """

    def __init__(self, model: nn.Module, world: World) -> None:
        self._handles: list[Any] = []
        if not world.distributed:
            return
        import torch.distributed as dist

        def hook(param: torch.Tensor) -> None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)

        for param in model.parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
