"""Multi-process runs with torch.distributed: who am I, which samples are mine, and the few collectives
the stages need. Every torch.distributed detail of sui lives here.

A stage runs as N processes (ranks) when it is started by torchrun (or by `launch`, which runs
torchrun's own launcher in-process, see stages/common.py): torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and `init_from_env` joins the process
group (gloo; nccl when every local rank has a GPU; env SUI_DIST_BACKEND forces one). Without those
variables, or with WORLD_SIZE=1, nothing is initialized and every helper here acts as the identity
of a single process, without importing torch.

Errors: a SuiError raised on one rank must not leave the others waiting in a collective, nor be
printed N times. So a stage runs everything that may fail (loading inputs, its share of the work)
inside `run_checked` / `all_gather_checked`, which exchange every rank's error (or result): an error
on any rank is then raised on every rank (marked `agreed`), `stages.common.run_stage` prints it once
(rank 0) and all ranks exit 1 together. Collectives after a checked point therefore never wait for a
rank that has given up. A rank that dies outright (a bug, a signal) is seen by torchrun, which stops
the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sui_core.errors import SuiError

T = TypeVar("T")

ENV_BACKEND = "SUI_DIST_BACKEND"  # gloo | nccl: overrides the automatic choice
ENV_TIMEOUT = "SUI_DIST_TIMEOUT"  # seconds a collective waits for the slowest rank (default 3600)
DEFAULT_TIMEOUT_S = 3600.0
EXIT_BARRIER_TIMEOUT_S = 60.0
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankError(SuiError):
    """A SuiError raised on another rank, re-raised here so that every rank stops together."""


def launched() -> bool:
    """True inside a process started by torchrun (its rendezvous variables are set)."""
    return all(os.environ.get(name) for name in _LAUNCH_VARS)


def _dist():
    """torch.distributed if torch is already imported and a process group is up, else None."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when no process group is initialized."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Rank 0: the one process that writes manifests, logs to MLflow and shows progress."""
    return world()[0] == 0


def backend() -> str | None:
    dist = _dist()
    return None if dist is None else str(dist.get_backend())


def choose_backend() -> str:
    """gloo, or nccl when CUDA is available with a GPU for every local rank; env SUI_DIST_BACKEND wins."""
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            raise SuiError(f"environment variable {ENV_BACKEND}: unknown backend {forced!r} (gloo or nccl)")
        return forced
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


def timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise SuiError(f"environment variable {ENV_TIMEOUT}: not a number of seconds ({raw!r})") from None
    if not value > 0:
        raise SuiError(f"environment variable {ENV_TIMEOUT}: must be > 0 seconds, got {raw!r}")
    return value


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; return (rank, world size).

    Does nothing (and returns (0, 1)) outside torchrun or with WORLD_SIZE=1.
    """
    if _dist() is not None:
        return world()
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    name = choose_backend()
    seconds = timeout_s()
    import torch
    import torch.distributed as dist

    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(name, timeout=datetime.timedelta(seconds=seconds))
    return world()


def shutdown() -> None:
    """Leave the process group (if any)."""
    dist = _dist()
    if dist is not None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(a: np.ndarray) -> np.ndarray:
    """The elementwise sum of `a` over all ranks, float64, the same on every rank (a copy of `a` alone)."""
    a = np.array(a, dtype=np.float64, copy=True)
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return a
    import torch

    tensor = torch.from_numpy(a).to(_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy().reshape(a.shape)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank `dst`; None on the other ranks."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(timeout: float | None = None) -> None:
    """Wait for every rank; with gloo, give up after `timeout` seconds (RuntimeError) instead of the
    process group's timeout."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    if timeout is not None and backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    else:
        dist.barrier()


def run_checked(fn: Callable[[], T]) -> T:
    """Run `fn()` on every rank and return this rank's result, once every rank has finished it.

    If `fn` raised a SuiError on any rank, every rank raises instead: the rank that failed its own
    error, the others a RankError with the same message (of the lowest failing rank). Either is
    marked `agreed = True`, so that the stage prints it once (rank 0). `fn` must not call
    collectives that a failing rank could skip.
    """
    return _checked(fn, gather=False)


def all_gather_checked(fn: Callable[[], T]) -> list[T]:
    """`run_checked` that returns every rank's (picklable) result, in rank order, on every rank."""
    return _checked(fn, gather=True)


def _checked(fn: Callable[[], Any], gather: bool) -> Any:
    error: SuiError | None = None
    value: Any = None
    try:
        value = fn()
    except SuiError as exc:
        error = exc
    if world()[1] == 1:
        if error is not None:
            raise error
        return [value] if gather else value
    sent = value if gather else None
    exchanged = all_gather_objects((None, sent) if error is None else (str(error), None))
    failed = [(rank, message) for rank, (message, _) in enumerate(exchanged) if message is not None]
    if failed:
        first_rank, message = failed[0]
        if error is not None and first_rank == world()[0]:
            error.agreed = True
            raise error
        raised = RankError(message)
        raised.agreed = True
        raise raised from None
    return [v for _, v in exchanged] if gather else value


def finish_after_error(exc: BaseException) -> None:
    """After an agreed error, wait (briefly) until every rank has reached the same point, so that rank 0
    has printed the message before any rank exits and torchrun stops the rest."""
    if getattr(exc, "agreed", False) and world()[1] > 1:
        with contextlib.suppress(Exception):
            barrier(EXIT_BARRIER_TIMEOUT_S)


@contextlib.contextmanager
def shared_atomic_dir(path: str | Path) -> Iterator[Path]:
    """`sui_core.io.atomic_dir` for all ranks together: rank 0 makes the temporary folder next to
    `path` and sends its name to every rank; every rank writes into it. Rank 0 renames it into place
    when its block succeeds (call it after the last `all_gather_checked`, so that every rank has
    written), or removes it on an error. Ranks other than 0 never rename or remove it."""
    from sui_core.io import atomic_dir

    if world()[1] == 1:
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if is_main():
        with atomic_dir(path) as tmp:
            broadcast_object(str(tmp))
            yield tmp
    else:
        yield Path(broadcast_object(None))


# --------------------------------------------------------------------------------------------------
# launching


def launch(module: str, args: list[str], nproc: int) -> int:
    """Run `python -m <module> <args>` as `nproc` processes on this machine with torchrun's launcher
    (`torchrun --standalone --nproc-per-node <nproc>`, run in this process); return the exit code.

    Each worker gets OMP_NUM_THREADS = cores / nproc (unless set). torchrun's own log lines and its
    error report are kept quiet: the workers print what went wrong. The exit code is the first failed
    worker's (1 for a SuiError; 128 + signal for a killed one), 128 + signal when this launcher is
    interrupted or terminated (the workers are then stopped with the same signal).
    """
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    threads_set = "OMP_NUM_THREADS" in os.environ
    if not threads_set:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    for name in list(logging.root.manager.loggerDict):  # torchrun's loggers each have a level of their own
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logs = tempfile.mkdtemp(prefix="sui-torchrun-")  # torchrun's per-run folder, removed afterwards
    parsed = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0", "--log-dir", logs, "-m", module, *args]
    )
    try:
        torchrun.run(parsed)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 + (-code or 1)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        if not threads_set:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0
