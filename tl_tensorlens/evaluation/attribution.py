"""Attribution over a dataset: many prompts, chosen registry methods, labelled immutable results.

:func:`attribute` walks a list of prompts and yields one :class:`Attribution` per (prompt, method):
the prompt's index, text and token strings, the method's name, its ``[pos_out, pos_in]`` map and the
readout it explains. Every prompt is captured once (one forward) and every method reads that capture.

**Batching.** The In+Out and In+Class collapses (``tensor_in_out``, ``tensor_in_class``) cost one
backward per output row through the frozen replay. For prompts of **equal token length** the frozen
values of ``B`` captures are stacked into one replay of batch ``B``: the replay is block-diagonal
across prompts, so one forward and one batched backward of ``n`` cotangents (each carrying every
prompt's readout at its row) give all ``B`` maps at once (:func:`batched_collapse`). That replaces
``B`` forwards and ``B`` backwards by one of each; the numbers are those of the per-prompt collapse up
to rounding (float64 tests hold them to 1e-12). Other methods always run per prompt.

**Sharding.** ``shard=(rank, world)`` keeps only the batches ``b`` with ``b % world == rank``; batches
are formed from the whole prompt list (:func:`plan_batches`), so a prompt is computed in the same batch,
hence with the same bits, whatever the number of ranks (see :mod:`tl_tensorlens.distributed`).
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import default_output, is_encoder
from tl_tensorlens._checks import as_int
from tl_tensorlens.errors import ArgumentError

#: Methods :func:`attribute` computes for a whole batch of equal-length prompts at once.
BATCHED_METHODS: tuple[str, ...] = ("tensor_in_out", "tensor_in_class")
_KIND = {"tensor_in_out": "in_out", "tensor_in_class": "in_class"}


@dataclass(frozen=True)
class Attribution:
    """One method's map for one prompt (immutable; ``map`` is the caller's own copy).

    Attributes:
        index: the prompt's index in the input list.
        text: the prompt as given (token ids joined by spaces when ids were given).
        tokens: the token strings, one per position.
        method: the registry name of the method.
        map: the relevance map ``[pos_out, pos_in]`` (rows: output positions).
        position: the output position explained (non-negative).
        target: what class-specific methods explain: a token id (decoders), a class index of the
            readout head (encoders), or None for class-agnostic methods.
        target_label: a readable name of ``target`` (the token string or class label), or None.
    """

    index: int
    text: str
    tokens: tuple[str, ...]
    method: str
    map: Float[Tensor, "pos_out pos_in"]
    position: int
    target: int | None
    target_label: str | None

    def to_row(self) -> dict[str, Any]:
        """A JSON-ready dict (``map`` as nested lists of floats, NaN as None)."""
        m = self.map.detach().to(torch.float64).cpu()
        rows = [[None if math.isnan(v) else v for v in r] for r in m.tolist()]
        return {
            "index": self.index,
            "text": self.text,
            "tokens": list(self.tokens),
            "method": self.method,
            "position": self.position,
            "target": self.target,
            "target_label": self.target_label,
            "map": rows,
        }


@dataclass(frozen=True)
class Readout:
    """A linear head that class-specific methods explain on encoders: ``logits = h[position] @ W + b``.

    Any object with ``W [d_model, n_classes]``, ``b``, ``position`` and optionally ``labels`` works
    (e.g. :class:`~tl_tensorlens.subjects.polarity.PolarityHead`).
    """

    W: Float[Tensor, "d_model n_classes"]
    b: Float[Tensor, " n_classes"]
    position: int = 0
    labels: tuple[str, ...] = ()


def check_methods(methods: Any) -> list[str]:
    """Registry names, checked (a deprecated name is mapped to its new one).

    Raises:
        ArgumentError: naming the unknown method and listing the registered ones; or an empty list.
    """
    from tl_tensorlens.methods import list_methods, method_info

    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Sequence) or not methods:
        raise ArgumentError("methods", methods, f"a non-empty list of registered methods: {', '.join(list_methods())}")
    names = []
    for m in methods:
        name = method_info(m).name  # ArgumentError names m and lists the known methods
        if name in names:
            raise ArgumentError("methods", m, "each method once")
        names.append(name)
    return names


def tokenize(model: Any, prompt: Any) -> Tensor:
    """One prompt as ``[pos]`` token ids: a string (BOS prepended by TL unless the text starts with
    it), or integer ids."""
    from tl_tensorlens.capture import as_prompt_tokens

    if isinstance(prompt, str):
        if not prompt.strip():
            raise ArgumentError("prompts", prompt, "non-empty prompts")
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ArgumentError("prompts", prompt, "token ids: this model has no tokenizer")
        if is_encoder(model):
            # the tokenizer adds [CLS] ... [SEP] (HookedEncoder.to_tokens returns a tuple)
            return as_prompt_tokens(torch.tensor(tok.encode(prompt)), model)[0]
        bos = getattr(tok, "bos_token", None)
        prepend = bool(bos) and not prompt.lstrip().startswith(bos)
        ids = model.to_tokens(prompt, prepend_bos=prepend, truncate=False)
        return as_prompt_tokens(ids, model)[0]
    return as_prompt_tokens(prompt, model)[0]


def _token_strings(model: Any, ids: Tensor) -> tuple[str, ...]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return tuple(str(int(i)) for i in ids)
    return tuple(str(t) for t in tok.convert_ids_to_tokens([int(i) for i in ids]))


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by equal length into batches of at most ``batch_size``, ordered by
    their first index (deterministic in the whole list, so every rank forms the same batches).

    Example:
        >>> plan_batches([3, 4, 3, 3, 4], 2)
        [[0, 2], [1, 4], [3]]
    """
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(int(n), []).append(i)
    batches = [idx[s : s + batch_size] for idx in by_len.values() for s in range(0, len(idx), batch_size)]
    return sorted(batches, key=lambda b: b[0])


def stack_states(states: Sequence[Any], start: int = 0) -> Any:
    """``B`` captures of one model and equal length as one capture of batch ``B`` (frozen values
    concatenated along the batch axis; only ``blocks.{start}.hook_resid_pre`` of the activations)."""
    from tl_tensorlens.capture import FrozenState

    first = states[0]
    if any(s.n_pos != first.n_pos for s in states):
        raise ArgumentError("states", [s.n_pos for s in states], "captures of equal length")
    key = f"blocks.{start}.hook_resid_pre"
    return FrozenState(
        tokens=torch.cat([s.tokens for s in states]),
        activations={key: torch.cat([s.activations[key] for s in states])},
        frozen={k: torch.cat([s.frozen[k] for s in states]) for k in first.frozen},
        mlp_kind=first.mlp_kind,
        rebuild_z=first.rebuild_z,
        backend=first.backend,
        n_layers=first.n_layers,
        logit_ratio=None if first.logit_ratio is None else torch.cat([s.logit_ratio for s in states]),
        head_act_ratio={k: torch.cat([s.head_act_ratio[k] for s in states]) for k in first.head_act_ratio},
        unsupported_outputs=first.unsupported_outputs,
        logits=None,
        signature=first.signature,
    )


def batched_collapse(
    model: Any,
    states: Sequence[Any],
    kind: str,
    *,
    directions: Sequence[Tensor] | None = None,
    output: Any = None,
) -> list[Float[Tensor, "pos_out pos_in"]]:
    """The In+Out (``kind="in_out"``) or In+Class (``"in_class"``, one readout ``directions[b]``
    ``[d_out]`` per prompt) collapse of ``B`` equal-length captures from ONE replay of batch ``B``.

    The frozen replay of the stacked captures is block-diagonal across prompts, so cotangent ``i``
    carries every prompt's readout at output row ``i`` and one batched backward of ``n`` cotangents
    yields all ``B`` maps. Equals ``TensorLens.from_state(...).collapse(kind, direction=...)`` per
    prompt up to rounding.
    """
    from tl_tensorlens.engine import Pullback, check_budget
    from tl_tensorlens.replay import ReplaySpec, run

    if kind not in ("in_out", "in_class"):
        raise ArgumentError("kind", kind, "'in_out' or 'in_class'")
    if kind == "in_class" and (directions is None or len(directions) != len(states)):
        raise ArgumentError("directions", directions, f"one readout [d_out] per capture ({len(states)})")
    big = stack_states(states)
    spec = ReplaySpec(output=output or default_output(model)).resolved(big)
    x = big.activations["blocks.0.hook_resid_pre"]  # [B, n, d]
    b, n, d = x.shape
    from tl_tensorlens.engine import default_memory_budget, format_bytes

    budget = default_memory_budget(x.device)
    pull = Pullback(lambda z: run(model, big, z[0], spec)[None], x)
    y = pull.y[0].detach()  # [B, n, d_out]: F(x), what In+Out reads
    d_out = int(y.shape[-1])
    need = x.element_size() * n * b * n * (d_out + 2 * d)
    check_budget(
        need, budget, f"a batched collapse of {b} prompts of {n} tokens ({format_bytes(need)})", "a smaller batch_size"
    )
    if kind == "in_out":
        u = y
    else:
        assert directions is not None
        u = torch.stack([v.detach().to(y) for v in directions])[:, None, :].expand(b, n, d_out)
    g = torch.zeros(n, b, n, d_out, dtype=y.dtype, device=y.device)
    rows = torch.arange(n, device=y.device)
    g[rows, :, rows] = u.transpose(0, 1)
    adj = pull(g)  # [n_rows, B, n, d]
    maps = (adj * x.to(adj)[None]).sum(-1)  # [n_rows, B, n_in]
    return [maps[:, k].clone() for k in range(b)]


def _target(model: Any, state: Any, position: int, head: Any) -> tuple[int | None, str | None, Any]:
    """(target, label, what to pass as ``target=``) for class-specific methods."""
    if is_encoder(model):
        if head is None:
            return None, None, None
        h = state.activations[_final_hidden(model, state)][0, int(head.position)]
        logits = h.to(head.W.dtype) @ head.W + head.b
        c = int(logits.argmax())
        labels = tuple(getattr(head, "labels", ()) or ())
        return c, labels[c] if c < len(labels) else f"class {c}", head.W[:, c]
    if state.logits is None:
        return None, None, None
    t = int(state.logits[0, position].argmax())
    return t, _token_strings(model, torch.tensor([t]))[0], t


def _final_hidden(model: Any, state: Any) -> str:
    from tl_tensorlens._backend import block_output_hook

    return block_output_hook(state.activations, int(model.cfg.n_layers) - 1)


def attribute(
    model: Any,
    prompts: Sequence[Any],
    methods: Sequence[str] | str,
    *,
    position: int = -1,
    head: Any = None,
    batch_size: int = 8,
    skip: Callable[[int, str], bool] | None = None,
    shard: tuple[int, int] | None = None,
    verify: bool = False,
    progress: bool | None = None,
) -> Iterator[Attribution]:
    """Yield the maps of ``methods`` for every prompt, labelled (see :class:`Attribution`).

    Args:
        model: a TransformerLens model (HookedTransformer, HookedEncoder or TransformerBridge).
        prompts: strings (tokenized with the model's tokenizer; BOS prepended unless the text starts
            with it) or token id lists / tensors.
        methods: registry names (``tl_tensorlens.methods.list_methods()``).
        position: the output position explained (decoders: the predicted next token there is the
            class-specific target; default the last). Encoders with ``head`` explain the head's
            predicted class at the head's position.
        head: for encoders, the readout head class-specific methods explain (an object with ``W``,
            ``b``, ``position``, optionally ``labels``: :class:`Readout`, ``PolarityHead``).
        batch_size: equal-length prompts per batched In+Out / In+Class replay (1: a per-prompt loop).
        skip: ``(index, method) -> True`` for results already stored (they are neither computed nor
            yielded; a prompt whose every method is skipped is not even captured).
        shard: ``(rank, world)``: only the batches ``b`` with ``b % world == rank``.
        verify: check on every prompt that the frozen replay reproduces the model and is affine at the
            methods' output (:func:`~tl_tensorlens.replay.verify_replay`: one batched replay of 5
            inputs per prompt; raises :class:`~tl_tensorlens.errors.VerificationError`).
        progress: a tqdm bar over prompts (None: shown for 32 prompts or more).

    Yields:
        :class:`Attribution`, grouped by batch (within a batch in prompt order, then by method).

    Raises:
        ArgumentError: an unknown method (the message lists the registered ones), an empty prompt,
            a position outside a prompt, a class-specific method on an encoder without ``head``.

    Example:
        >>> from tl_tensorlens.subjects import load_subject
        >>> model = load_subject("induction", backend="bridge").model
        >>> prompts = ["<bos> t83 t94 t12 t35 t43 t80 t27 t83 t94 t12 t35 t43 t80",  # <bos> A A[:-1]
        ...            "<bos> t11 t22 t33 t11 t22"]
        >>> out = list(attribute(model, prompts, ["tensor_in_class", "attn_rollout"]))
        >>> [(a.index, a.method, tuple(a.map.shape)) for a in out]  # doctest: +NORMALIZE_WHITESPACE
        [(0, 'tensor_in_class', (14, 14)), (0, 'attn_rollout', (14, 14)),
         (1, 'tensor_in_class', (6, 6)), (1, 'attn_rollout', (6, 6))]
        >>> out[0].target_label, out[0].position  # the induction answer, predicted at the last position
        ('t27', 13)
    """
    from tl_tensorlens.capture import capture, capture_batch
    from tl_tensorlens.engine import progress_bar
    from tl_tensorlens.methods import get_method, method_info

    names = check_methods(methods)
    batch_size = as_int("batch_size", batch_size, lo=1)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ArgumentError("prompts", type(prompts).__name__, "a list of prompts (strings or token ids)")
    if shard is not None:
        rank, world = shard
        world = as_int("shard", world, lo=1, allowed="(rank, world) with 0 <= rank < world")
        rank = as_int("shard", rank, lo=0, hi=world - 1, allowed="(rank, world) with 0 <= rank < world")
    else:
        rank, world = 0, 1
    encoder = is_encoder(model)
    class_specific = [m for m in names if method_info(m).class_specific]
    if encoder and class_specific and head is None:
        raise ArgumentError(
            "methods",
            ",".join(class_specific),
            "class-agnostic methods for an encoder without a readout head (pass head=, or a subject with one "
            "such as 'polarity')",
        )
    position = as_int("position", position)
    ids = [tokenize(model, p) for p in prompts]
    for k, t in enumerate(ids):
        n = int(t.shape[0])
        if not -n <= position < n:
            raise ArgumentError("position", position, f"-{n}..{n - 1} (prompt {k} has {n} tokens)")
    skip = skip or (lambda i, m: False)
    batches = [b for j, b in enumerate(plan_batches([int(t.shape[0]) for t in ids], batch_size)) if j % world == rank]
    todo = {i: [m for m in names if not skip(i, m)] for b in batches for i in b}
    bar = progress_bar(sum(1 for v in todo.values() if v), "attribute", progress)
    for batch in batches:
        batch = [i for i in batch if todo[i]]
        if not batch:
            continue
        if len(batch) > 1:
            states = dict(zip(batch, capture_batch(model, torch.stack([ids[i] for i in batch])), strict=True))
        else:
            states = {i: capture(model, ids[i][None]) for i in batch}
        if verify:
            from tl_tensorlens.replay import verify_replay

            for i in batch:
                verify_replay(model, states[i], outputs=(default_output(model),))
        info = {}
        for i in batch:
            n = int(ids[i].shape[0])
            pos = position % n if not encoder else (int(head.position) if head is not None else position % n)
            info[i] = (pos, *_target(model, states[i], pos, head))
        batched: dict[tuple[int, str], Tensor] = {}
        for m in names:
            want = [i for i in batch if m in todo[i]]
            if m not in BATCHED_METHODS or len(want) < 2 or _overridden(m):
                continue
            dirs = None
            if m == "tensor_in_class":
                dirs = [_direction(model, info[i][3]) for i in want]
            for i, mp in zip(
                want, batched_collapse(model, [states[i] for i in want], _KIND[m], directions=dirs), strict=True
            ):
                batched[(i, m)] = mp
        for i in batch:
            pos, target, label, arg = info[i]
            text = prompts[i] if isinstance(prompts[i], str) else " ".join(str(int(t)) for t in ids[i])
            toks = _token_strings(model, ids[i])
            for m in todo[i]:
                mp = batched.get((i, m))
                if mp is None:
                    cs = method_info(m).class_specific
                    mp = get_method(m)(model, states[i], position=None, target=arg if cs else None)
                cs = method_info(m).class_specific
                yield Attribution(
                    i, text, toks, m, mp.detach().clone(), pos, target if cs else None, label if cs else None
                )
            del states[i]
            bar.update(1)
    bar.close()


def _overridden(name: str) -> bool:
    """True when a built-in batched method was re-registered with another function."""
    from tl_tensorlens.methods import method_info

    return getattr(method_info(name).fn, "__name__", "") != name


def _direction(model: Any, arg: Any) -> Tensor:
    """``target=`` of In+Class as a readout direction at the default output (a token's unembedding
    column for decoders)."""
    if isinstance(arg, Tensor) and arg.is_floating_point():
        return arg
    return model.W_U.detach()[:, int(arg)]


__all__ = [
    "BATCHED_METHODS",
    "Attribution",
    "Readout",
    "attribute",
    "batched_collapse",
    "check_methods",
    "plan_batches",
    "stack_states",
    "tokenize",
]
