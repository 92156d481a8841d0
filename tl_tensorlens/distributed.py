"""Many processes on ``torch.distributed``: shard prompts, or the rows / cotangent chunks / probes of one
prompt, across ranks, with results bit-identical to one process.

Launch with PyTorch's own launcher (no launcher of this library)::

    torchrun --nproc-per-node 2 -m tl_tensorlens attribute --model induction --prompts p.txt ...

:func:`init_from_env` joins the process group only when ``WORLD_SIZE > 1`` is in the environment (set
by ``torchrun``): backend ``gloo`` on CPU, ``nccl`` when the model lives on CUDA (one GPU per rank:
``torchrun`` sets ``LOCAL_RANK``, the device is ``cuda:{LOCAL_RANK}``). Override with
``TL_TENSORLENS_DIST_BACKEND``.

**One prompt across ranks.** :func:`broadcast_state`: rank 0 captures and broadcasts the frozen values
(plain tensors); every rank then replays the identical operator. :func:`collapse_norm` (exact Norm
map) and :func:`collapse_randomized_norm` shard output rows, :func:`slice` shards the engine's
cotangent chunks. A row (or chunk) is computed by exactly the code and chunk plan of one process
(:meth:`TensorLens.collapse`, :meth:`TensorLens.slice`), and the ranks' disjoint parts are combined
by an all-reduce sum in which every element has one non-zero contribution, so the result equals one
process's bit for bit. The randomized Norm's probes come from one generator stream: a rank advances
the stream past the rows it does not compute, so every row sees the probes it sees in one process.
A slice is one chunk when it fits the memory budget at once; it parallelises when it needs several
(large ``d_out``, e.g. ``output="logits"``, or a smaller ``memory_budget``).
"""

import os
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.errors import ArgumentError, StateMismatchError

BACKEND_ENV = "TL_TENSORLENS_DIST_BACKEND"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """True inside an initialized process group (of any size)."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def is_active() -> bool:
    """True inside an initialized process group of more than one rank."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group.

    Example:
        >>> rank_world()
        (0, 1)
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def local_device(device: str | None = None) -> str:
    """The device of this rank: ``device`` as given, with a bare ``"cuda"`` made ``cuda:{LOCAL_RANK}``
    under ``torchrun``."""
    if device is None:
        return "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def init_from_env(device: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes when ``WORLD_SIZE > 1`` (else do nothing).

    Returns:
        ``(rank, world_size)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = _dist()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return rank_world()
    if not dist.is_available():
        raise ArgumentError("WORLD_SIZE", world, "1: this PyTorch build has no torch.distributed")
    cuda = device is not None and str(device).startswith("cuda")
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(torch.device(local_device(str(device))))
    dist.init_process_group(backend=backend)
    return rank_world()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_active():
        _dist().barrier()


def shutdown() -> None:
    """Leave the process group (no-op outside one)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(fallback: torch.device) -> torch.device:
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if dist.get_backend() == "gloo" else fallback


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def broadcast_state(model: Any, state: Any = None, *, src: int = 0) -> Any:
    """Rank ``src`` passes its capture, every other rank ``None``; all ranks return the same
    :class:`~tl_tensorlens.capture.FrozenState` (bitwise: plain tensors are broadcast), checked
    against this rank's model. Outside a process group, returns ``state``.

    Raises:
        StateMismatchError: a rank's model differs from the model ``src`` captured on (config,
            weights or dtype).
    """
    from tl_tensorlens.capture import FrozenState, _signature_differences, model_signature

    if not is_active():
        if state is None:
            raise ArgumentError("state", None, "a FrozenState (one process: nothing to receive)")
        return state
    dist = _dist()
    rank = dist.get_rank()
    here = _model_device(model)
    comm = _comm_device(here)
    names = ("activations", "frozen", "head_act_ratio")
    if rank == src:
        if not isinstance(state, FrozenState):
            raise ArgumentError("state", type(state).__name__, f"a FrozenState on rank {src}")
        tensors: list[tuple[str, str, Tensor]] = [("", "tokens", state.tokens)]
        for group in names:
            tensors += [(group, k, v) for k, v in getattr(state, group).items()]
        for field in ("logit_ratio", "logits"):
            value = getattr(state, field)
            if value is not None:
                tensors.append(("", field, value))
        meta = {
            "tensors": [(g, k, tuple(v.shape), v.dtype) for g, k, v in tensors],
            "mlp_kind": state.mlp_kind,
            "rebuild_z": state.rebuild_z,
            "backend": state.backend,
            "n_layers": state.n_layers,
            "unsupported_outputs": state.unsupported_outputs,
            "signature": state.signature,
        }
        box: list[Any] = [meta]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=src)
    meta = box[0]
    received: dict[tuple[str, str], Tensor] = {}
    for j, (group, key, shape, dtype) in enumerate(meta["tensors"]):
        if rank == src:
            buf = tensors[j][2].detach().to(comm).contiguous()
        else:
            buf = torch.empty(shape, dtype=dtype, device=comm)
        dist.broadcast(buf, src=src)
        received[(group, key)] = buf.to(here)
    if rank == src:
        return state
    sig = meta["signature"]
    local = model_signature(model)
    if sig is not None:
        diffs = _signature_differences(sig, local)
        if diffs:
            raise StateMismatchError(f"rank {rank}'s model is not the one rank {src} captured on: {'; '.join(diffs)}")
    return FrozenState(
        tokens=received[("", "tokens")],
        activations={k: v for (g, k), v in received.items() if g == "activations"},
        frozen={k: v for (g, k), v in received.items() if g == "frozen"},
        mlp_kind=meta["mlp_kind"],
        rebuild_z=meta["rebuild_z"],
        backend=meta["backend"],
        n_layers=meta["n_layers"],
        logit_ratio=received.get(("", "logit_ratio")),
        head_act_ratio={k: v for (g, k), v in received.items() if g == "head_act_ratio"},
        unsupported_outputs=meta["unsupported_outputs"],
        logits=received.get(("", "logits")),
        signature=None if sig is None else local,
    )


def _sum_parts(t: Tensor) -> Tensor:
    """All-reduce of disjoint parts (each element non-zero on at most one rank): exact."""
    if is_active():
        dist = _dist()
        buf = t.to(_comm_device(t.device)).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t = buf.to(t.device)
    return t


def collapse_norm(lens: Any, positions: Any = None) -> Float[Tensor, "n_rows pos_in"]:
    """``lens.collapse("norm", positions=...)`` with the rows sharded across ranks (row ``r`` on rank
    ``r % world``); bit-identical to one process. Every rank returns the whole map."""
    from tl_tensorlens._checks import as_positions

    rank, world = rank_world()
    rows = as_positions("positions", positions, lens.n_pos)
    x = lens.input
    M = torch.zeros(len(rows), lens.n_pos, dtype=x.dtype, device=x.device)
    for r, i in enumerate(rows):
        if r % world == rank:
            M[r] = lens._norm_row(i, len(rows)).to(M)
    return _sum_parts(M)


def collapse_randomized_norm(lens: Any, probes: int = 16, *, positions: Any = None, seed: int = 0) -> Any:
    """``lens.collapse_randomized_norm(probes, positions=..., seed=...)`` with the rows sharded across
    ranks; bit-identical to one process (each rank advances the probe stream past the rows it skips)."""
    import math

    from tl_tensorlens._checks import as_int, as_positions
    from tl_tensorlens.tensors import RandomizedNorm

    probes = as_int("probes", probes, lo=2, allowed="an integer >= 2 (a standard error needs two probes)")
    seed = as_int("seed", seed)
    rank, world = rank_world()
    rows = as_positions("positions", positions, lens.n_pos)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = lens.n_pos
    sq = torch.zeros(len(rows), n, dtype=lens.input.dtype)
    se = torch.zeros_like(sq)
    for r, i in enumerate(rows):
        if r % world != rank:
            lens._skip_probes(probes, gen)
            continue
        samples = lens._randomized_row(i, probes, len(rows), gen)
        sq[r] = samples.mean(0).cpu()
        se[r] = (samples.std(0, unbiased=True) / math.sqrt(probes)).cpu()
    dev = lens.input.device
    return RandomizedNorm(_sum_parts(sq.to(dev)), _sum_parts(se.to(dev)), probes)


def slice(lens: Any, pos_out: int) -> Float[Tensor, "d_out pos_in d_in"]:
    """``lens.slice(pos_out)`` with the engine's cotangent chunks sharded across ranks (chunk ``c`` on
    rank ``c % world``); bit-identical to one process."""
    rank, world = rank_world()
    return _sum_parts(lens._slice(pos_out, select=lambda c: c % world == rank))


__all__ = [
    "BACKEND_ENV",
    "barrier",
    "broadcast_state",
    "collapse_norm",
    "collapse_randomized_norm",
    "init_from_env",
    "is_active",
    "is_initialized",
    "local_device",
    "rank_world",
    "shutdown",
    "slice",
]
