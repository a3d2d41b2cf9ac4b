"""Data-parallel runs over several processes (``torchrun`` / ``accelerate launch``): ranks and collectives.

A launcher starts one process per device and describes the group in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`init` joins it through accelerate's
``PartialState`` (gloo on CPU, NCCL on CUDA), the same state the training loop's ``Accelerator`` then
uses. Everything here is a no-op for a single process, so one code path serves both (docs/distributed.md).

Objects cross processes as JSON in byte tensors, never as pickles.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState

T = TypeVar("T")

# Exceptions that rank 0 may raise for a user mistake, re-raised with the same type on every other rank.
# Subclasses (e.g. ConfigError, a ValueError) travel as the first of these they are an instance of.
_USER_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError)
}


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun or accelerate launch"
        ) from None


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on the process that writes files (global rank 0), and in a single-process run."""
    return rank() == 0


def uses_cpu(device: str | None) -> bool:
    """Whether processes of a run whose model goes to ``device`` (``cpu``, ``auto``, ``cuda[:i]``) talk over gloo."""
    return device in (None, "cpu") or not torch.cuda.is_available()


def init(device: str | None) -> None:
    """Join the process group the launcher describes (no-op for one process or when already joined)."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return
    PartialState(cpu=uses_cpu(device))


# DTensor (the parameters of an FSDP2-sharded model) memoises its plans per DeviceMesh in module-level caches,
# and a DeviceMesh holds its ProcessGroups (``_pg_registry``). (module, attribute path) of each cache's clearer:
# redistribute planners and transforms, mesh topology, sharding propagation (Python and C++ fast path).
_DTENSOR_CACHE_CLEARERS = (
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
)


def _clear_dtensor_caches() -> None:
    """Empty DTensor's per-mesh caches so that the meshes, and the process groups they hold, can be freed.

    These are private torch functions, looked up by name so that a torch release that renames one only
    skips it (the multi-process tests then fail on the threads left running, tests/test_distributed.py)."""
    if "torch.distributed.tensor" not in sys.modules:  # DTensor never used: nothing cached
        return
    for module_name, path in _DTENSOR_CACHE_CLEARERS:
        try:
            target: Any = importlib.import_module(module_name)
            for name in path.split("."):
                target = getattr(target, name)
        except (ImportError, AttributeError):
            continue
        target()


def shutdown() -> None:
    """Leave the process group this process joined and stop its threads (no-op without one).

    A gloo (or NCCL) process group runs C++ threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) that stop only
    when the last reference to the group goes; `destroy_process_group` drops torch.distributed's own
    references but not the others'. Threads still running while the interpreter shuts down can abort it
    ("terminate called without an active exception", exit code -6) after the run has finished. With DDP the
    model held the last reference and is gone by now; with FSDP2 DTensor's caches keep the DeviceMesh, hence
    the group, alive until interpreter exit, so they are emptied first, and the meshes (which sit in
    reference cycles) collected after (docs/distributed.md, "Leaving the process group").
    """
    if dist.is_available() and dist.is_initialized():
        _clear_dtensor_caches()
        dist.destroy_process_group()
        gc.collect()


def process_device(device: str | None) -> str | None:
    """The device this process puts its model on: ``cuda:LOCAL_RANK`` for a multi-process CUDA run."""
    if launched_world_size() <= 1 or uses_cpu(device) or device not in ("auto", "cuda"):
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def per_process_batch(global_batch: int, world: int) -> int:
    """Examples per process of a global batch; raises ValueError naming the fix when ``world`` does not divide it."""
    if global_batch % world:
        fits = ", ".join(str(world * k) for k in range(1, 4) if world * k >= global_batch) or str(world)
        raise ValueError(
            f"train.batch_size={global_batch} (the global batch, summed over processes) is not divisible by the "
            f"{world} processes of this launch; set train.batch_size to a multiple of {world} (e.g. {fits}) "
            f"or launch a number of processes that divides {global_batch}"
        )
    return global_batch // world


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all processes (a copy; ``value`` itself for one process)."""
    if not active():
        return value
    out = value.detach().clone().to(_comm_device())
    dist.all_reduce(out)
    return out.to(value.device)


def all_gather_json(obj: Any) -> list[Any]:
    """``obj`` (anything JSON can hold; floats round-trip exactly, NaN/inf included) from every rank, in rank order."""
    if not active():
        return [obj]
    device = _comm_device()
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(s.item())].tolist())) for c, s in zip(chunks, sizes, strict=True)]


_split = {"on": True}


@contextmanager
def lockstep() -> Iterator[None]:
    """Within this block :func:`shard` gives every process all items (an FSDP-sharded model: every forward
    is a collective, so all processes must run the same ones)."""
    saved, _split["on"] = _split["on"], False
    try:
        yield
    finally:
        _split["on"] = saved


def _splitting() -> bool:
    return active() and _split["on"]


def splitting() -> bool:
    """True when the processes work on different data (training, split evaluation), False outside a
    process group or inside :func:`lockstep` (every process sees every example)."""
    return _splitting()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: positions rank, rank + world, ... (all of them for one process)."""
    return list(items[rank() :: world_size()]) if _splitting() else list(items)


def unshard(local: Sequence[Any], total: int) -> list[Any]:
    """Every rank's :func:`shard` results put back in the original order of the ``total`` items."""
    if not _splitting():
        return list(local)
    out: list[Any] = [None] * total
    world = world_size()
    for r, part in enumerate(all_gather_json(list(local))):
        out[r::world] = part
    return out


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` on rank 0 only (file writes) and make every rank wait for it; its result on rank 0, else None.

    A user error raised on rank 0 is raised on every rank with its message, as the first of FileExistsError,
    FileNotFoundError, NotADirectoryError, ValueError it is an instance of, so all processes stop cleanly;
    other exceptions become RuntimeError elsewhere.
    """
    if not active():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as raised:
            kind = next(
                (name for name, cls in _USER_ERRORS.items() if isinstance(raised, cls)), "RuntimeError"
            )
            all_gather_json([kind, str(raised)])
            raise
    error = all_gather_json(error)[0]
    if error is not None:
        name, message = error
        raise _USER_ERRORS.get(name, RuntimeError)(message)
    return result
