"""Training on several processes: torch.distributed (DDP), started by ``torchrun`` or ``ponder train --nproc``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_env`
joins that process group (gloo on the CPU, nccl on CUDA). Everything that must agree across ranks goes through
the small helpers here: the loss and the figures are averaged over ranks, the "every token has halted" decision
is taken over the global batch, validation runs on rank 0 and its result is broadcast.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ponder.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over ranks of each value (one all-reduce for all of them)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_true(self, flag: torch.Tensor | bool) -> bool:
        """True when ``flag`` holds on every rank."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.as_tensor(flag).to(device=self._device(), dtype=torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable Python values only: metrics, not checkpoints)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]


SINGLE = Dist()


def check_split(batch_size: int, world_size: int) -> None:
    """``train.batch_size`` is the global batch: every rank takes the same share of it."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size = {batch_size} (the global batch) does not split evenly over "
                          f"{world_size} processes; use a multiple of {world_size}")


def from_env(device: str) -> tuple[Dist, str]:
    """Join the process group ``torchrun`` describes in the environment, if any; returns the context and the
    device this rank trains on (``cuda:LOCAL_RANK`` when the run's device is a GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    import torch.distributed as dist

    ctx = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu:
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {ctx.local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                              "start at most one process per GPU")
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        # env:// under torchrun; ponder train --nproc passes a file to meet through (see launch)
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=os.environ.get("PONDER_DIST_INIT", "env://"),
                                rank=ctx.rank, world_size=world)
    return ctx, device


def no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword that stops it copying rank 0's buffers at each forward: every rank computes its own
    (ADyT's gradient norms, from the all-reduced gradients), which is what the consistency test checks.
    torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers``."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def close() -> None:
    """Leave the process group (a no-op when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str], *, grace_s: float = 10.0) -> int:
    """``ponder train --nproc N``: run ``ponder <argv>`` as N processes on this host, as ``torchrun --standalone
    --nproc-per-node N -m ponder <argv>`` would, with one difference: the processes meet through a file rather
    than a TCP store (torchrun's store listens on every interface), and gloo talks over loopback, so nothing
    listens beyond 127.0.0.1. When one process fails the others are stopped. Returns the first failure's exit
    status, or 0."""
    import tempfile
    import time

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="ponder-ddp-") as tmp:
        base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "PONDER_DIST_INIT": f"file://{Path(tmp) / 'rendezvous'}"}
        base.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
        base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        procs = [subprocess.Popen([sys.executable, "-m", "ponder", *argv],
                                  env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
        status = 0
        try:
            while any(p.poll() is None for p in procs):
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if failed:
                    status = failed[0]
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:
            status = 130
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + grace_s
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return status or next((p.returncode for p in procs if p.returncode), 0)


def _loopback_interface() -> str:
    """The name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS and the BSDs)."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    if "lo" in names:
        return "lo"
    return next((n for n in sorted(names) if n.startswith("lo")), "lo")
