"""Starting and stopping process groups: under torchrun (environment variables) or spawned locally.

Every process group gets a timeout, so when a rank fails the others stop with an error
instead of waiting forever in a collective.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maxscore._distributed as process_group
from maxscore._checks import check_int

DEFAULT_TIMEOUT_S = 300.0


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def launched_by_torchrun() -> bool:
    """True when the environment of ``torchrun`` (WORLD_SIZE, RANK, MASTER_ADDR) is set."""
    return all(name in os.environ for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_process_group(
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> None:
    """Initializes the default process group (from torchrun's environment unless given).

    On CUDA each rank takes device ``LOCAL_RANK`` (or ``rank % device_count``).
    """
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    backend = backend or default_backend()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank if rank is not None else 0))
        torch.cuda.set_device(local % torch.cuda.device_count())
    where = {} if rank is None else {"rank": rank, "world_size": world_size, "init_method": init_method}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **where)


@contextlib.contextmanager
def explain_timeouts(timeout_s: float) -> Iterator[None]:
    """Re-raises a collective's timeout as an error that says what probably happened."""
    try:
        yield
    except RuntimeError as error:
        text = str(error).lower()
        if "timed out" not in text and "timeout" not in text:
            raise
        raise RuntimeError(
            f"rank {process_group.rank()}: a collective timed out after {timeout_s:g} s waiting for the "
            "other ranks: another rank failed or stalled (see its output); raise the timeout for slow "
            f"steps. ({error})"
        ) from error


def destroy_process_group() -> None:
    if process_group.initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, timeout_s: float, args) -> None:
    torch.set_num_threads(1)
    init_process_group(
        backend, timeout_s, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}"
    )
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_process_group()


def spawn(
    fn: Callable, world_size: int, *args, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process
    group (localhost TCP rendezvous).  ``fn`` must be importable (defined at module level).

    Raises:
        ProcessRaisedException / ProcessExitedException: a rank failed (its traceback included).
    """
    check_int("world_size", world_size)
    mp.spawn(_entry, args=(fn, world_size, _free_port(), backend, timeout_s, args), nprocs=world_size)
