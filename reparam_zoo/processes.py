"""The training run's processes (single or torchrun/DDP, with the few collectives the loop needs) and its
graceful stop on SIGINT/SIGTERM."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .errors import ReparamError

__all__ = ["Processes", "StopRequest", "STOP_GRACE_S", "check_device", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_ALLOCATION = 1 << 30  # bytes: anything smaller is served from, and freed back to, the process's heap
_KEPT_FREE = (1 << 31) - 1  # bytes of free heap top kept before any is returned (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse rather than hand it back to the OS.

    A training step allocates and frees the same large tensors every time (activations, gradients,
    refocused kernels). By default glibc serves such blocks with fresh mmaps and returns them on free, so
    every step page-faults all of them in again: on a 2-core CPU steps took 8-42% more CPU time that way
    (see benchmarks/README.md). The price is that the process's memory does not shrink after its peak,
    which a training process reaches again every step anyway. Process-wide and permanent: `reparam train`
    calls it for its own process; in your own program call it where the same holds (or use jemalloc or
    tcmalloc, as PyTorch's CPU tuning guide suggests). Returns whether it applied (glibc only).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEPT_ALLOCATION)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE))


def check_device(device: Union[str, torch.device]) -> torch.device:
    """`device` as a torch.device that exists here, or a ReparamError saying why not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ReparamError(f"unknown device '{device}' (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ReparamError(f"device '{device}': no CUDA GPU is available here")
        if device.index is not None and device.index >= count:
            raise ReparamError(f"device '{device}': only {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    elif device.type != "cpu":
        raise ReparamError(f"device '{device}': training runs on cpu or cuda")
    return device


@dataclass
class Processes:
    """This process's place in a (possibly single-process) run, and the collectives the loop needs."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    in_group: bool = False  # a process group runs (also with one process, under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the run goes through a process group (DDP, collectives): several processes, or one
        launched by torchrun, which then runs the same DDP code path as a multi-process run."""
        return self.in_group or self.world_size > 1

    @classmethod
    def from_env(cls, device: Optional[Union[str, torch.device]]) -> "Processes":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = check_device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        # torchrun sets RANK and MASTER_ADDR (what init_process_group's env:// rendezvous reads) also for
        # --nproc_per_node 1: such a run starts its group, so a one-process DDP run tests the DDP path
        launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
        if world_size <= 1 and not launched:
            return cls(device=device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank, device=device,
                   owns_group=owns, in_group=True)

    def sum(self, values: Sequence[float]) -> List[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> List[float]:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: Sequence[float], op) -> List[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order (picklable objects; tensors on the CPU)."""
        if not self.distributed:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def union(self, items: Sequence[str]) -> List[str]:
        return sorted({i for part in self.all_gather(list(items)) for i in part})

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and share its result or its ReparamError with every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except ReparamError as e:
                error = e
        if self.distributed:
            box = [result, None if error is None else str(error)]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
            if box[1] is not None and error is None:
                raise ReparamError(box[1])
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


STOP_GRACE_S = 10.0  # seconds a stop request waits for the run to reach a stop point, on top of 3 slowest steps


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at its next stop point (after the current step, or the current
    validation batch), with a checkpoint; a second signal acts as usual (KeyboardInterrupt / termination).

    One signal must be enough to stop, also when the run is stuck where it cannot look at the request (a
    read that blocks, a step that never ends): if the run has not acknowledged the request within
    `grace_s` plus three times its slowest step so far, a watchdog calls `on_expire` (which may tidy up and
    returns the line to print) and ends the process with the signal's exit status. Files are written
    atomically, so the last checkpoint stays whole and the run can be resumed from it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace_s: Optional[float] = None, on_expire: Optional[Callable[[int], str]] = None):
        self.signal: Optional[int] = None
        self.grace_s = STOP_GRACE_S if grace_s is None else grace_s
        self.on_expire = on_expire
        self.slowest_step_s = 0.0
        self._previous: Dict[int, Any] = {}
        self._watchdog: Optional[threading.Timer] = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers only live there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self._restore()
        self._watchdog = threading.Timer(self.deadline_s, self._expire, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    @property
    def deadline_s(self) -> float:
        return self.grace_s + 3 * self.slowest_step_s

    def step_took(self, seconds: float) -> None:
        """A step's (or a validation batch's) duration: the watchdog waits longer for a slow run."""
        self.slowest_step_s = max(self.slowest_step_s, seconds)

    def acknowledge(self) -> None:
        """The run reached a stop point and is stopping: no need for the watchdog any more."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _expire(self, signum: int) -> None:
        message = ""
        try:
            if self.on_expire is not None:
                message = self.on_expire(signum)
        except BaseException:  # stopping matters more than tidying up
            pass
        name = signal.Signals(signum).name
        os.write(2, (f"error: {name}: the run did not reach a stop point within {self.deadline_s:.0f} s (blocked in "
                     f"a read or a step?); stopped without a new checkpoint{'; ' + message if message else ''}\n").encode())
        os._exit(128 + signum)

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self.acknowledge()
        self._restore()
        return False

    @property
    def requested(self) -> bool:
        return self.signal is not None
