"""Cross-layer aggregation of per-layer token maps: rollout (product) and the mean over layers."""

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.baselines._common import row_normalize
from tl_tensorlens.errors import TensorLensError


def rollout(
    maps: Float[Tensor, "layer pos_out pos_in"], *, add_identity: bool = True
) -> Float[Tensor, "pos_out pos_in"]:
    """Attention rollout (Abnar & Zuidema 2020, Eq. 1): ``R = Â_{L-1} ⋯ Â_1 Â_0``.

    Each layer's map is row-normalized; with ``add_identity`` it becomes ``0.5·Â + 0.5·I`` (the
    authors' way to account for the residual connection, rows still sum to 1). Maps that already
    contain the residual (W-AttnResLN, GlbEnc, ALTI) are rolled out without the identity, as
    Modarressi et al. 2022 and Ferrando et al. 2022 do: adding it again would count the residual
    twice.

    Example:
        >>> a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
        >>> rollout(a)
        tensor([[1.0000, 0.0000],
                [0.2500, 0.7500]])
    """
    if maps.dim() != 3 or maps.shape[-1] != maps.shape[-2]:
        raise TensorLensError(f"rollout needs maps [layer, pos, pos], got {tuple(maps.shape)}")
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    joint = eye
    for layer_map in maps:
        step = row_normalize(layer_map)
        if add_identity:
            step = 0.5 * step + 0.5 * eye
        joint = step @ joint
    return joint


def layer_mean(maps: Float[Tensor, "layer pos_out pos_in"]) -> Float[Tensor, "pos_out pos_in"]:
    """Mean over layers of the row-normalized maps (each layer weighs the same, whatever the
    scale of its norms; for ``attn`` the rows already sum to 1).

    Example:
        >>> layer_mean(torch.tensor([[[2.0, 2.0]], [[0.0, 1.0]]]))
        tensor([[0.2500, 0.7500]])
    """
    if maps.dim() != 3:
        raise TensorLensError(f"layer_mean needs maps [layer, pos, pos], got {tuple(maps.shape)}")
    return row_normalize(maps).mean(0)
