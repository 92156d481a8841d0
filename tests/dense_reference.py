"""An independent dense construction of T from the weights and the frozen values.

Written from the formulas of the math note (§1; TensorLens Eq. 9, 11, 13-19, App. B), never through
the replay hooks: every sub-layer is an (n·D)×(n·D) matrix on the row-major ``vec(X)`` and blocks
compose by matrix products. Only HookedTransformer / HookedEncoder (TL 3.x) weights are read.
"""

import torch
from torch import Tensor

from tl_tensorlens._backend import runs_parallel_blocks
from tl_tensorlens.capture import FrozenState


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def norm_matrix(model, state: FrozenState, module_path: str) -> Tensor:
    """LayerNorm/RMSNorm (and *Pre) with frozen per-token scale: blockdiag(diag(w) C / s_n)."""
    norm_type = model.cfg.normalization_type
    mod = model.get_submodule(module_path)
    s = state.frozen[f"{module_path}.hook_scale"][0, :, 0]
    x0 = state.x0
    D = x0.shape[-1]
    w = getattr(mod, "w", None)
    w = torch.ones(D, dtype=x0.dtype) if w is None else w.detach()
    if state.backend == "bridge" and getattr(model.cfg, "rmsnorm_uses_offset", False):
        w = 1 + w  # Gemma's HF RMSNorm scales by (1 + weight); HookedTransformer folds the 1 in
    C = _eye(D, x0) - (1.0 / D if norm_type in ("LN", "LNPre") else 0.0) * torch.ones(D, D, dtype=x0.dtype)
    # row-major vec: y_n = x_n C diag(w)/s_n as rows -> matrix acting on column x_n is diag(w) C / s_n
    return torch.block_diag(*[torch.diag(w) @ C / s_i for s_i in s])


def attention_matrix(model, state: FrozenState, layer: int) -> Tensor:
    """Σ_h kron(A_h, (W_V^h W_O^h)ᵀ) (Eq. 9)."""
    attn = model.blocks[layer].attn
    A = state.pattern(layer)
    W_V, W_O = attn.W_V.detach(), attn.W_O.detach()
    if W_V.shape[0] != A.shape[0]:  # GQA on the Bridge: W_V per kv group; head h reads group h // (H / n_kv)
        W_V = W_V.repeat_interleave(A.shape[0] // W_V.shape[0], dim=0)
    out = 0
    for h in range(A.shape[0]):
        out = out + torch.kron(A[h].contiguous(), (W_V[h] @ W_O[h]).T.contiguous())
    return out


def mlp_matrix(model, state: FrozenState, layer: int) -> Tensor:
    """blockdiag_n(W_outᵀ diag(r_n) W_inᵀ) (Eq. 13-14); gated: r_n = act(frozen gate)."""
    mlp = model.blocks[layer].mlp
    kind = state.mlp_kind[layer]
    if kind == "gated":
        # HookedTransformer's MLP has act_fn; a boot_native GatedMLPBridge wraps a NativeGatedMLP (.act)
        act = getattr(mlp, "act_fn", None) or mlp._original_component.act
        r = act(state.frozen[f"blocks.{layer}.mlp.hook_pre"][0])
    elif kind == "plain":
        r = state.frozen[f"blocks.{layer}.mlp.hook_post"][0]
    else:
        raise NotImplementedError(kind)
    W_in, W_out = mlp.W_in.detach(), mlp.W_out.detach()
    return torch.block_diag(*[W_out.T @ torch.diag(r_n) @ W_in.T for r_n in r])


def block_matrix(model, state: FrozenState, layer: int) -> Tensor:
    """One block's T_l from its sub-layer matrices (pre-LN, parallel, sandwich, post-norm, BERT)."""
    cfg = model.cfg
    n, D = state.x0.shape
    eye = _eye(n * D, state.x0)
    p = f"blocks.{layer}"
    has_norm = cfg.normalization_type is not None

    def ln(name: str) -> Tensor:
        return norm_matrix(model, state, f"{p}.{name}") if has_norm else eye

    attn = attention_matrix(model, state, layer)
    if state.backend == "encoder":
        return ln("ln2") @ (eye + mlp_matrix(model, state, layer)) @ ln("ln1") @ (eye + attn)
    arch = getattr(cfg, "original_architecture", None) or ""
    if arch.startswith("Olmo2") or arch.startswith("Olmo3"):
        return (eye + ln("ln2") @ mlp_matrix(model, state, layer)) @ (eye + ln("ln1") @ attn)
    # Sandwich norms (Gemma-2/3): the HookedTransformer config says so; a Bridge's config may not
    # (Gemma-2 reports use_normalization_before_and_after=False), but its blocks hold the modules.
    sandwich = bool(cfg.use_normalization_before_and_after) or f"{p}.ln1_post.hook_scale" in state.frozen
    attn_path = attn @ ln("ln1")
    if sandwich:
        attn_path = ln("ln1_post") @ attn_path
    if cfg.attn_only:
        return eye + attn_path
    mlp_path = mlp_matrix(model, state, layer) @ ln("ln2")
    if sandwich:
        mlp_path = ln("ln2_post") @ mlp_path
    if runs_parallel_blocks(model):  # not cfg.parallel_attn_mlp: boot_native ignores it
        return eye + attn_path + mlp_path
    return (eye + mlp_path) @ (eye + attn_path)


def model_matrix(
    model, state: FrozenState, output: str = "resid_post", start: int = 0, stop: int | None = None
) -> Tensor:
    """T = [T_lnf] T_{stop-1} ... T_start as an (n·d_out)×(n·D) matrix."""
    stop = state.n_layers if stop is None else stop
    n, D = state.x0.shape
    T = _eye(n * D, state.x0)
    for layer in range(start, stop):
        T = block_matrix(model, state, layer) @ T
    if output == "ln_final" and model.cfg.normalization_type is not None and state.backend != "encoder":
        T = norm_matrix(model, state, "ln_final") @ T
    return T


def as_tensor4(M: Tensor, n: int, d_out: int, d_in: int) -> Tensor:
    """(n·d_out)×(n·d_in) matrix on row-major vec -> T[pos_out, d_out, pos_in, d_in]."""
    return M.reshape(n, d_out, n, d_in)
