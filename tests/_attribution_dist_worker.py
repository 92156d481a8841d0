"""Run by tests/test_attribution.py under ``python -m torch.distributed.run --nproc-per-node 2``:
the attribute CLI sharded over prompts, then one prompt sharded over rows / chunks / probes."""

import sys
from pathlib import Path

import torch

PROMPT = "<bos> t83 t94 t12 t35 t43 t83 t94 t12"
BUDGET = 2_000_000  # small enough that a slice needs several cotangent chunks (13 here)


def lens_of(state=None):
    from tl_tensorlens.subjects import load_subject
    from tl_tensorlens.tensors import TensorLens

    model = load_subject("induction", backend="bridge", dtype=torch.float64).model
    return model, (
        None if state is None else TensorLens.from_state(model, state, output="ln_final", memory_budget=BUDGET)
    )


def one_prompt(dist_mod=None):
    """The one-prompt results: sharded when ``dist_mod`` is tl_tensorlens.distributed, else one process."""
    from tl_tensorlens.capture import capture
    from tl_tensorlens.tensors import TensorLens

    model, _ = lens_of()
    if dist_mod is None:
        lens = TensorLens.from_state(
            model, capture(model, model.to_tokens(PROMPT, prepend_bos=False)), output="ln_final", memory_budget=BUDGET
        )
        r = lens.collapse_randomized_norm(8, seed=3)
        return {
            "norm": lens.collapse("norm"),
            "rand_sq": r.squared,
            "rand_se": r.squared_stderr,
            "slice": lens.slice(6),
        }
    rank, world = dist_mod.rank_world()
    state = capture(model, model.to_tokens(PROMPT, prepend_bos=False)) if rank == 0 else None
    state = dist_mod.broadcast_state(model, state)
    lens = TensorLens.from_state(model, state, output="ln_final", memory_budget=BUDGET)
    r = dist_mod.collapse_randomized_norm(lens, 8, seed=3)
    mine = lens._slice(6, select=lambda c: c % world == rank)
    seen: list[int] = []
    lens._slice(6, select=lambda c: seen.append(c) or False)  # only records the chunk indices
    n_chunks = len(seen)
    flags = [torch.zeros(1) for _ in range(world)]
    torch.distributed.all_gather(flags, torch.tensor([float(bool(mine.abs().sum() > 0))]))
    return {
        "norm": dist_mod.collapse_norm(lens),
        "rand_sq": r.squared,
        "rand_se": r.squared_stderr,
        "slice": dist_mod.slice(lens, 6),
        "slice_chunks": n_chunks,
        "contributed": [bool(f.item()) for f in flags],
    }


if __name__ == "__main__":
    from tl_tensorlens import distributed
    from tl_tensorlens.cli import main

    prompts, out = sys.argv[1], Path(sys.argv[2])
    distributed.init_from_env()
    code = main(
        [
            "attribute",
            "--model",
            "induction",
            "--prompts",
            prompts,
            "--out",
            str(out / "two.jsonl"),
            "--methods",
            "tensor_in_out,tensor_in_class",
            "--dtype",
            "float64",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    res = one_prompt(distributed)
    if distributed.rank_world()[0] == 0:
        torch.save(res, out / "rank0.pt")
    distributed.shutdown()
