"""Data-parallel training of a fold under ``torchrun``: which process this is, and the few collective
steps the train stage needs.

``torchrun --nproc_per_node=N -m lung_effnet.cli train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
``init_from_env`` joins them into one process group: NCCL when training on CUDA (each process on
``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun (``WORLD_SIZE`` unset or 1) it does nothing, and
every helper here answers for one process (rank 0 of 1) without communicating: a single-process run
takes exactly the code path it took before this module existed.

Who does what: rank 0 alone writes (ingest products, the preprocessed cache, checkpoints, MLflow,
predictions, every output); the other ranks wait for it, then read. What rank 0 alone computes (a
fold's validation metrics, its test predictions, the folds) is sent to every rank (``on_main``,
``from_main``), so that all ranks take the same decisions (early stopping included) and so reach the
same collective calls in the same order: a rank that skipped one would leave the others waiting.
An exception in what rank 0 runs for everyone is raised on every rank. A rank that dies is torchrun's
to handle: it stops the other processes of the job.

These small Python objects travel on a gloo group of their own (``_control``) with a long timeout
(``WAIT_TIMEOUT``): the other ranks may wait hours while rank 0 ingests and preprocesses an archive,
far longer than NCCL's watchdog lets a collective wait.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lung_effnet.errors import ConfigError

T = TypeVar("T")

WAIT_TIMEOUT = timedelta(hours=24)
"""How long a rank waits for rank 0 on the control group (data preparation, an evaluation)."""

_control: Any = None  # the gloo process group for objects and barriers, once initialised


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes training together: 1 without torchrun (or before ``init_from_env``)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 to ``world_size() - 1``; 0 in a single process."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``): the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files and talks to MLflow: rank 0, or the only process."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun's environment describes; a no-op without torchrun, or when
    already joined. Returns whether this process trains with others.

    ``device``: where training runs (``fold.resolve_device``). CUDA: backend NCCL and this process on
    ``cuda:LOCAL_RANK``; CPU: gloo. Ranks other than 0 keep only errors of the ``lung_effnet`` log
    (rank 0 says the rest once). The group is destroyed when the process exits.

    Raises:
        ConfigError: torchrun's variables are incomplete, or ``LOCAL_RANK`` names a GPU this
            machine does not have.
    """
    global _control
    if not launched_by_torchrun():
        return False
    if is_initialized():
        return True
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                          "start several processes with torchrun (README, Train)")
    options: dict[str, Any] = {}
    if device.type == "cuda":
        index = int(os.environ["LOCAL_RANK"])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={index}, but this machine has {torch.cuda.device_count()} CUDA device(s): "
                              "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(index)
        options["device_id"] = torch.device("cuda", index)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **options)
    _control = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    atexit.register(destroy)
    if rank() != 0:
        logging.getLogger("lung_effnet").setLevel(logging.ERROR)
    return True


def destroy() -> None:
    """Leave the process group (registered to run at exit by ``init_from_env``)."""
    global _control
    if is_initialized():
        dist.destroy_process_group()
    _control = None


def rank_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA ``device`` in a process group; ``device`` itself otherwise."""
    return torch.device("cuda", local_rank()) if device.type == "cuda" and is_initialized() else device


def barrier() -> None:
    """Wait until every rank has reached this call (no-op in one process)."""
    if world_size() > 1:
        dist.barrier(group=_control)


def from_main(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (the other ranks' argument is ignored); ``obj`` itself in one
    process. Every rank must call it, in the same order. ``obj`` is pickled: keep it small (metrics,
    manifest rows, a fold's predictions), never image tensors."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def _sendable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (it is re-raised on the other ranks), else a ``RuntimeError`` with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # an exception class with its own constructor arguments, an unpicklable attribute
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _announce(fn: Callable[[], T], send_result: bool) -> tuple[bool, Any]:
    """Rank 0 runs ``fn`` and sends every rank either its result (or ``None``) or the exception it raised,
    then re-raises that exception itself. Returns ``(is rank 0, what rank 0 sent or its result)``."""
    if is_main():
        try:
            value = fn()
        except Exception as exc:
            from_main(("error", _sendable(exc)))
            raise
        from_main(("value", value if send_result else None))
        return True, value
    kind, payload = from_main()
    if kind == "error":
        raise payload
    return False, payload


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone and its result sent to every rank; an exception it raises is raised on
    every rank. In one process: ``fn()``. For work only rank 0 may do (it writes, or reads what only it
    can be sure of) and whose result all ranks need. The result is pickled: keep it small."""
    if world_size() == 1:
        return fn()
    return _announce(fn, send_result=True)[1]


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, rank 0 first: the others start once it has returned, so they read what
    it wrote (the preprocessed cache) instead of writing it themselves. An exception on rank 0 is
    raised on every rank. In one process: ``fn()``. Nothing is sent but the outcome."""
    if world_size() == 1:
        return fn()
    main, value = _announce(fn, send_result=False)
    return value if main else fn()


def sum_across_ranks(values: Iterable[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over the ranks (all ranks get the sums); ``values`` in one process.
    ``device``: this rank's training device (NCCL reduces CUDA tensors)."""
    values = list(values)
    if world_size() == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def copy_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (parameters of a module outside DDP) with rank 0's, in place. No-op in one process."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over the ranks, in place: what DDP does for the model,
    for a module trained beside it outside DDP (the lesion head). Where no rank has a gradient they
    stay ``None`` (as in one process: the optimizer skips them); where some have, a missing one counts
    as zeros. No-op in one process."""
    parameters = list(parameters)
    if world_size() == 1 or not parameters:
        return
    device = parameters[0].device
    has_grad = float(any(p.grad is not None for p in parameters))
    if sum_across_ranks([has_grad], device)[0] == 0:
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad.div_(world_size())


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` (already on ``device``) wrapped in ``DistributedDataParallel``: its forward is the
    model's, its backward averages the gradients over the ranks, and at every forward it copies rank
    0's buffers (BatchNorm statistics) to the others. Train through the wrapper; evaluate, save and
    load the model itself (its state dict has no ``module.`` prefix)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
