"""Control methods: the random ranking every relevance method must beat."""

import zlib
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.methods.attention import activations_of, read


def random_method(
    model: Any, state: Any, *, position: int | None = None, target: Any = None, seed: int = 0
) -> Float[Tensor, "pos_out pos_in"]:
    """Random-ranking control: i.i.d. uniform relevance, seeded by the input itself.

    The seed mixes ``seed`` with a CRC of the capture's ``blocks.0.hook_resid_pre``, so the same
    input always gets the same ranking (a resumed run recomputes identical rows) while different
    inputs get independent rankings.
    """
    x0 = read(activations_of(state), "blocks.0.hook_resid_pre")
    digest = zlib.crc32(x0.detach().to(torch.float64).cpu().numpy().tobytes())
    gen = torch.Generator().manual_seed((digest * 1_000_003 + seed) % (2**63))
    n = x0.shape[0]
    return torch.rand(n, n, generator=gen, dtype=torch.float64)


__all__ = ["random_method"]
