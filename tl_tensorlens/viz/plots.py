"""Pictures of TensorLens maps (the optional ``plot`` extra).

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot`` (no global state,
nothing is shown; save with ``fig.savefig(path)``). matplotlib is imported inside the functions, so
``import tl_tensorlens`` never loads it; circuitsvis is used by :func:`attention_html` and
:func:`relevance_html` only when installed, otherwise a self-contained HTML fragment is written.

Colour conventions: maps that can be negative (In+Out, class/logit collapses, patching effects) use
a diverging map centred at 0 (red positive, blue negative); non-negative maps (Norm collapse,
attention) a sequential map. For causal maps the entries above the diagonal are structurally zero
and drawn grey, so "zero" and "cannot attend" are not confused.
"""

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.errors import TensorLensError

_DIVERGING = "RdBu_r"
_SEQUENTIAL = "viridis"


def _np(x: Any) -> Any:
    import numpy as np

    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=float)


def token_labels(model: Any, tokens: Any) -> list[str]:
    """Printable labels of a prompt's tokens (the tokenizer's strings, else ``#id``).

    Example:
        >>> token_labels(None, [5, 7])
        ['#5', '#7']
    """
    ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"#{i}" for i in ids]
    out = []
    for i in ids:
        s = tok.decode([i])
        out.append(s.replace("\n", "\\n") if s.strip() else repr(s))
    return out


#: Visible stand-ins for whitespace in axis labels (the JSON keeps the decoded strings).
_VISIBLE = {" ": "␣", "\t": "⇥", "\n": "↵", "\\n": "↵", "\r": "⏎"}
#: Marks the positions drawn apart from the colour scale (attention sinks, BOS).
SINK_MARK = "⚓"


def display_label(token: str, *, max_len: int = 14) -> str:
    r"""An axis label for a token string: whitespace made visible, matplotlib's ``$`` mathtext
    escaped, long tokens shortened with ``…``.

    Example:
        >>> display_label(" Paris")
        '␣Paris'
        >>> display_label("$x$")
        '\\$x\\$'
    """
    t = token
    if len(t) >= 2 and t[0] == t[-1] == "'":  # token_labels' repr of blank tokens
        inner = t[1:-1].encode("ascii", "backslashreplace").decode("unicode_escape")
        if not inner.strip():
            t = inner
    for k in ("\\n", "\n", "\t", "\r", " "):
        t = t.replace(k, _VISIBLE[k])
    if len(t) > max_len:
        t = t[: max_len - 1] + "…"
    return t.replace("$", "\\$")


def _labels(tokens: Sequence[str], apart: Sequence[int] = ()) -> list[str]:
    marked = set(apart)
    return [(SINK_MARK if j in marked else "") + display_label(t) for j, t in enumerate(tokens)]


def _kept(a: Any, apart: Sequence[int]) -> Any:
    """``a`` with the columns drawn apart set to NaN (they do not set the colour scale)."""
    if not apart:
        return a
    b = a.astype(float).copy()
    b[..., list(apart)] = float("nan")
    return b


def _overlay_apart(ax: Any, a: Any, apart: Sequence[int]) -> None:
    """Draw the columns ``apart`` in grey on their own scale (darker = larger |value|), hatched."""
    import numpy as np

    if not apart:
        return
    import matplotlib
    from matplotlib.colors import Normalize

    cols = list(apart)
    b = np.full(a.shape, np.nan)
    b[:, cols] = np.abs(a[:, cols])
    finite = b[np.isfinite(b)]
    hi = float(finite.max()) if finite.size else 1.0
    from matplotlib.colors import ListedColormap

    # light greys only, so the values written into these cells stay readable
    greys = ListedColormap(matplotlib.colormaps["Greys"](np.linspace(0.04, 0.45, 64))).with_extremes(bad=(0, 0, 0, 0))
    ax.imshow(b, cmap=greys, norm=Normalize(0.0, hi if hi > 0 else 1.0), aspect="auto", interpolation="nearest")
    for c in cols:
        ax.axvspan(c - 0.5, c + 0.5, fill=False, hatch="///", edgecolor="#b07000", lw=0.0)


def _check_map(M: Any, tokens: Sequence[str], what: str) -> Any:
    a = _np(M)
    if a.ndim != 2:
        raise TensorLensError(f"{what}: expected a 2-D map, got shape {a.shape}")
    if a.shape[1] != len(tokens):
        raise TensorLensError(f"{what}: map has {a.shape[1]} input columns but {len(tokens)} token labels")
    return a


def _norm_for(a: Any, signed: bool | None) -> tuple[Any, str]:
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm

    finite = a[np.isfinite(a)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if signed is None:
        signed = lo < 0
    if signed:
        m = max(abs(lo), abs(hi), 1e-300)
        return TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m), _DIVERGING
    return Normalize(vmin=min(lo, 0.0), vmax=hi if hi > lo else lo + 1), _SEQUENTIAL


def _fontsize(n: int) -> float:
    return max(4.5, min(9.0, 220.0 / max(n, 1)))


def _draw_map(
    fig: Any,
    ax: Any,
    a: Any,
    tokens_in: Sequence[str],
    tokens_out: Sequence[str],
    *,
    title: str,
    cbar_label: str,
    signed: bool | None,
    mask_upper: bool | None,
    ticks: bool = True,
    apart: Sequence[int] = (),
    shared: Any = None,
) -> Any:
    """Draw one map; ``shared`` is a ``(norm, cmap name)`` that replaces the map's own scale (and
    its colour bar, drawn once by the caller). Returns the image."""
    import numpy as np

    a = a.astype(float).copy()
    n_out, n_in = a.shape
    if mask_upper is None:
        mask_upper = n_out == n_in and n_in > 1 and bool(np.all(a[np.triu_indices(n_in, 1)] == 0))
    if mask_upper and n_out == n_in:
        a[np.triu_indices(n_in, 1)] = np.nan
    apart = [c for c in apart if 0 <= c < n_in]
    kept = _kept(a, apart)
    norm, cmap_name = _norm_for(kept, signed) if shared is None else shared
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#d9d9d9")
    im = ax.imshow(kept, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _overlay_apart(ax, a, apart)
    fs = _fontsize(max(n_in, n_out))
    if ticks:
        ax.set_xticks(range(n_in), labels=_labels(tokens_in, apart), rotation=90, fontsize=fs)
        ax.set_yticks(range(n_out), labels=_labels(tokens_out), fontsize=fs)
        ax.set_xlabel("input token (pos_in)", fontsize=8)
        ax.set_ylabel("output token (pos_out)", fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if shared is None:
        cb = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        if cbar_label:
            cb.set_label(cbar_label, fontsize=7)
    return im


def plot_map(
    M: Float[Tensor, "pos_out pos_in"],
    tokens: Sequence[str],
    *,
    tokens_out: Sequence[str] | None = None,
    title: str = "",
    cbar_label: str = "",
    signed: bool | None = None,
    mask_upper: bool | None = None,
    figsize: tuple[float, float] | None = None,
    apart: Sequence[int] = (),
) -> Any:
    """One N×N map as a heatmap with token labels and a colour bar.

    Args:
        M: the map (rows: output positions, columns: input positions).
        tokens: labels of the input positions (and of the rows unless ``tokens_out`` is given).
        tokens_out: row labels (e.g. for a subset of output positions).
        title: figure title.
        cbar_label: colour-bar label (what the values are).
        signed: force a diverging (True) or sequential (False) colour map; None decides from the data.
        mask_upper: grey out the upper triangle (None: when it is all zero, i.e. a causal map).
        figsize: inches (default grows with the prompt).
        apart: input positions (columns) drawn apart: hatched, in grey on their own scale, marked
            ``⚓`` on the axis, and left out of the colour scale (attention sinks, BOS).

    Returns:
        A matplotlib ``Figure``.

    Example:
        >>> import torch
        >>> fig = plot_map(torch.tril(torch.rand(3, 3)), ["a", "b", "c"], title="demo")
        >>> len(fig.axes)  # the map and its colour bar
        2
    """
    from matplotlib.figure import Figure

    a = _check_map(M, tokens, "plot_map")
    rows = list(tokens) if tokens_out is None else list(tokens_out)
    if len(rows) != a.shape[0]:
        raise TensorLensError(f"plot_map: map has {a.shape[0]} rows but {len(rows)} row labels")
    side = min(12.0, 3.0 + 0.28 * max(a.shape))
    fig = Figure(figsize=figsize or (side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    _draw_map(
        fig, ax, a, tokens, rows, title=title, cbar_label=cbar_label, signed=signed, mask_upper=mask_upper, apart=apart
    )
    return fig


def plot_map_grid(
    maps: Sequence[Any] | Tensor,
    tokens: Sequence[str],
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    title: str = "",
    cbar_label: str = "",
    signed: bool | None = None,
    apart: Sequence[int] = (),
    cell: float | None = None,
    shared_scale: bool = False,
) -> Any:
    """A grid of N×N maps (per layer, per head, per method), each with its own colour bar.

    Tick labels are drawn on the left column and bottom row only, to stay readable.

    Args:
        maps: ``[k, pos, pos]`` tensor or a sequence of maps.
        tokens: token labels.
        titles: one per map (default ``0..k-1``).
        ncols: columns of the grid.
        title: figure title.
        cbar_label: colour-bar label.
        signed: see :func:`plot_map`.
        apart: see :func:`plot_map`.
        cell: inches per panel (default grows with the prompt).
        shared_scale: one colour scale (and one colour bar) for all panels, so they compare.

    Example:
        >>> import torch
        >>> fig = plot_map_grid(torch.rand(3, 4, 4), list("abcd"), titles=["L0", "L1", "L2"], ncols=2)
        >>> sum(ax.get_title() in ("L0", "L1", "L2") for ax in fig.axes)
        3
    """
    from matplotlib.figure import Figure

    arrays = [_check_map(m, tokens, "plot_map_grid") for m in maps]
    if not arrays:
        raise TensorLensError("plot_map_grid: no maps")
    k = len(arrays)
    names = [str(i) for i in range(k)] if titles is None else list(titles)
    if len(names) != k:
        raise TensorLensError(f"plot_map_grid: {k} maps but {len(names)} titles")
    ncols = max(1, min(ncols, k))
    nrows = (k + ncols - 1) // ncols
    n = len(tokens)
    cell = cell or min(4.2, 2.2 + 0.11 * n)
    fig = Figure(figsize=(ncols * (cell + 0.9), nrows * cell + (0.5 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    shared = None
    if shared_scale:
        import numpy as np

        shared = _norm_for(np.stack([_kept(a.astype(float), apart) for a in arrays]), signed)
    im = None
    for idx in range(nrows * ncols):
        ax = axes[idx // ncols][idx % ncols]
        if idx >= k:
            ax.set_axis_off()
            continue
        a = arrays[idx]
        im = _draw_map(
            fig,
            ax,
            a,
            tokens,
            tokens,
            title=names[idx],
            cbar_label=cbar_label,
            signed=signed,
            mask_upper=None,
            apart=apart,
            shared=shared,
        )
        fs = _fontsize(n) * 0.85
        last_in_col = idx + ncols >= k
        xl, yl = _labels(tokens, apart), _labels(tokens)
        ax.set_xticks(range(n), labels=xl if last_in_col else [""] * n, rotation=90, fontsize=fs)
        ax.set_yticks(range(a.shape[0]), labels=yl if idx % ncols == 0 else [""] * a.shape[0], fontsize=fs)
        if not last_in_col:
            ax.set_xlabel("")
        if idx % ncols:
            ax.set_ylabel("")
    if shared is not None and im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        if cbar_label:
            cb.set_label(cbar_label + (" (without ⚓)" if apart else ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_relevance_strip(
    relevance: Float[Tensor, " pos_in"],
    tokens: Sequence[str],
    *,
    title: str = "",
    cbar_label: str = "relevance",
    signed: bool | None = None,
) -> Any:
    """The relevance of each input token as a coloured strip with the tokens written in the cells.

    Example:
        >>> import torch
        >>> fig = plot_relevance_strip(torch.tensor([0.1, -0.5, 2.0]), ["a", "b", "c"], title="row")
        >>> fig.axes[0].get_title()
        'row'
    """
    from matplotlib.figure import Figure

    a = _np(relevance).reshape(1, -1)
    if a.shape[1] != len(tokens):
        raise TensorLensError(f"plot_relevance_strip: {a.shape[1]} values but {len(tokens)} tokens")
    n = len(tokens)
    width = min(18.0, 2.5 + 0.62 * n)
    fig = Figure(figsize=(width, 1.9), layout="constrained")
    ax = fig.add_subplot()
    norm, cmap = _norm_for(a, signed)
    im = ax.imshow(a, cmap=cmap, norm=norm, aspect="auto")
    fs = max(5.0, min(9.0, 300.0 / max(n, 1)))
    for j, t in enumerate(tokens):
        v = norm(a[0, j])
        dark = v > 0.75 or v < 0.25
        ax.text(
            j,
            0,
            t,
            ha="center",
            va="center",
            rotation=90 if n > 24 else 0,
            fontsize=fs,
            color="white" if dark else "black",
        )
    ax.set_xticks(range(n), labels=[str(j) for j in range(n)], fontsize=6)
    ax.set_yticks([])
    ax.set_xlabel("input position", fontsize=8)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(cbar_label, fontsize=7)
    return fig


def _annotate_apart(ax: Any, arr: Any, apart: Sequence[int], fontsize: float) -> None:
    """Write each value drawn apart into its cell (as a multiple of the row's colour scale)."""
    import numpy as np

    for r in range(arr.shape[0]):
        for c in apart:
            v = arr[r, c]
            if np.isfinite(v):
                ax.text(c, r, f"{v:+.2g}×", ha="center", va="center", fontsize=fontsize, color="black", rotation=90)


def plot_method_comparison(
    maps: Mapping[str, Any],
    tokens: Sequence[str],
    *,
    position: int | None = None,
    title: str = "",
    apart: Sequence[int] = (),
) -> Any:
    """Side-by-side comparison of methods for one prompt.

    With ``position=None`` each method's N×N map is drawn in one panel; with a position, each
    method's row for that output position becomes one line of a stacked relevance panel
    (each row scaled to its maximum absolute value, since methods live on different scales).

    Args:
        maps: method name -> ``[pos_out, pos_in]`` map.
        tokens: token labels.
        position: output position whose rows are compared (negative counts from the end).
        title: figure title.
        apart: input positions left out of each row's scale (see :func:`plot_map`); in the stacked
            rows their value is written in the cell as a multiple of that row's scale.

    Example:
        >>> import torch
        >>> m = {"norm": torch.rand(3, 3), "in_out": torch.randn(3, 3)}
        >>> fig = plot_method_comparison(m, list("abc"), position=-1)
        >>> fig.axes[0].get_yticklabels()[0].get_text()
        'norm'
    """
    import numpy as np
    from matplotlib.figure import Figure

    if not maps:
        raise TensorLensError("plot_method_comparison: no maps")
    if position is None:
        return plot_map_grid(
            list(maps.values()), tokens, titles=list(maps), ncols=min(3, len(maps)), title=title, apart=apart
        )
    n = len(tokens)
    apart = [c for c in apart if 0 <= c < n]
    rows = []
    for name, M in maps.items():
        a = _check_map(M, tokens, f"plot_method_comparison[{name}]")
        p = position + a.shape[0] if position < 0 else position
        if not 0 <= p < a.shape[0]:
            raise TensorLensError(f"plot_method_comparison: position {position} out of range for '{name}'")
        r = a[p]
        kept = _kept(r[None], apart)[0]
        scale = np.nanmax(np.abs(kept)) if np.isfinite(kept).any() else 1.0
        rows.append(r / (scale if scale > 0 else 1.0))
    arr = np.stack(rows)
    width = min(18.0, 3.5 + 0.55 * n)
    fig = Figure(figsize=(width, 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    kept_arr = _kept(arr, apart)
    norm, cmap = _norm_for(kept_arr, None)
    im = ax.imshow(kept_arr, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _overlay_apart(ax, arr, apart)
    _annotate_apart(ax, arr, apart, fontsize=6.0)
    ax.set_yticks(range(len(rows)), labels=list(maps), fontsize=8)
    ax.set_xticks(range(n), labels=_labels(tokens, apart), rotation=90, fontsize=_fontsize(n))
    ax.set_xlabel(
        "input token"
        + (f"  ({SINK_MARK}: drawn apart, value written as a multiple of the row's scale)" if apart else ""),
        fontsize=8,
    )
    ax.set_title(title or f"relevance of each input for output position {position}", fontsize=9)
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    cb.set_label("relevance / max |relevance|" + (" (without ⚓)" if apart else ""), fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return fig


def plot_logit_lens(
    result: Any,
    tokens: Sequence[str],
    *,
    position: int = -1,
    vocab: Sequence[str] | None = None,
    apart: Sequence[int] = (),
) -> Any:
    """The tensor logit lens at one output position: layers × input tokens.

    Each row is the class-specific map of the layer's logit-lens prediction; the row label names
    the token explained and TransformerLens' own logit-lens top-1 at that layer (the two agree when
    the lens was built with ``token=None``).

    Args:
        result: a :class:`~tl_tensorlens.workflows.TensorLogitLens`.
        tokens: input token labels.
        position: the output position (must be among ``result.positions``).
        vocab: strings of token ids for the row labels (default ``#id``).
        apart: input positions left out of the colour scale (see :func:`plot_map`).
    """
    from matplotlib.figure import Figure

    rows = _np(result.row(position))
    n = int(result.tokens.shape[0])
    p = position + n if position < 0 else position
    r = result.positions.index(p)

    def name(i: int) -> str:
        return display_label(vocab[i]) if vocab is not None else f"#{i}"

    labels = [
        f"after {k} block{'s' if k != 1 else ''}: {name(int(result.target[li, r]))} "
        f"(logit {float(result.tl_logits[li, r]):.3g})"
        + (
            ""
            if int(result.tl_top[li, r]) == int(result.target[li, r])
            else f" (TL top-1 {name(int(result.tl_top[li, r]))})"
        )
        for li, k in enumerate(result.depths)
    ]
    width = min(18.0, 4.5 + 0.5 * n)
    fig = Figure(figsize=(width, 1.4 + 0.42 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    apart = [c for c in apart if 0 <= c < rows.shape[1]]
    kept = _kept(rows, apart)
    norm, cmap = _norm_for(kept, True)
    im = ax.imshow(kept, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _overlay_apart(ax, rows, apart)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    ax.set_xticks(range(len(tokens)), labels=_labels(tokens, apart), rotation=90, fontsize=_fontsize(n))
    ax.set_xlabel("input token", fontsize=8)
    ax.set_title(
        f"tensor logit lens at position {p} ('{display_label(tokens[p])}'): which inputs drive each layer's prediction",
        fontsize=9,
    )
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    cb.set_label("share of the logit-lens logit", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return fig


def plot_patching(
    values: Float[Tensor, "layer index"],
    *,
    labels: Sequence[str],
    title: str = "",
    xlabel: str = "position",
    reference: Float[Tensor, "layer index"] | None = None,
) -> Any:
    """An activation-patching result ``[layer, pos or head]``; with ``reference`` (e.g. the tensor
    prediction) the two are drawn side by side with the largest difference in the title."""
    from matplotlib.figure import Figure

    a = _np(values)
    panels = [("patching", a)] + ([("predicted from the tensor", _np(reference))] if reference is not None else [])
    fig = Figure(
        figsize=(min(16.0, 3.0 + 0.45 * a.shape[1]) * len(panels), 1.6 + 0.5 * a.shape[0]), layout="constrained"
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, arr) in zip(axes, panels, strict=True):
        norm, cmap = _norm_for(arr, True)
        im = ax.imshow(arr, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(arr.shape[1]), labels=list(labels), rotation=90, fontsize=_fontsize(arr.shape[1]))
        ax.set_yticks(range(arr.shape[0]), labels=[f"L{i}" for i in range(arr.shape[0])], fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(name, fontsize=9)
        cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.05)
        cb.set_label("metric after patch", fontsize=7)
        cb.ax.tick_params(labelsize=7)
    if reference is not None:
        import numpy as np

        diff = float(np.abs(a - panels[1][1]).max())
        fig.suptitle(f"{title}  (max |difference| = {diff:.1e})".strip(), fontsize=10)
    elif title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_component_patching(result: Any, tokens: Sequence[str]) -> Any:
    """Frozen-component patching: the metric per variant (bars) and each variant's logit collapse
    at the read position (rows)."""
    from matplotlib.figure import Figure

    metric = _np(result.metric)
    maps = _np(result.maps)
    k = len(result.labels)
    n = len(tokens)
    fig = Figure(figsize=(min(18.0, 7.0 + 0.45 * n), 1.6 + 0.5 * k), layout="constrained")
    ax_bar, ax_map = fig.subplots(1, 2, width_ratios=[1, 2.2])
    ax_bar.barh(range(k), metric, color=["#4c72b0" if c else "#999999" for c in result.components])
    ax_bar.set_yticks(range(k), labels=list(result.labels), fontsize=8)
    ax_bar.invert_yaxis()
    ax_bar.axvline(0, color="black", lw=0.6)
    ax_bar.set_xlabel("metric at the clean input", fontsize=8)
    ax_bar.set_title("which frozen class carries the change", fontsize=9)
    norm, cmap = _norm_for(maps, True)
    im = ax_map.imshow(maps, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax_map.set_yticks(range(k), labels=[""] * k)
    ax_map.set_xticks(range(n), labels=list(tokens), rotation=90, fontsize=_fontsize(n))
    ax_map.set_title(f"logit collapse at position {result.position} ('{tokens[result.position]}')", fontsize=9)
    cb = fig.colorbar(im, ax=ax_map, pad=0.01, fraction=0.04)
    cb.set_label("share of the logit", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return fig


def plot_perturbation_curves(
    curves: Any,
    *,
    fractions: Sequence[float | int] | None = None,
    metric: str = "accuracy",
    title: str = "",
) -> Any:
    """Perturbation curves: method -> values over the masked fractions.

    Accepts the ``MethodSummary`` list of :func:`tl_tensorlens.evaluation.perturbation.summarize` (one
    panel per order, mean curves) or a mapping ``{method: [value per fraction]}`` with ``fractions``.
    """
    if not isinstance(curves, Mapping):
        fig = _plot_summaries(list(curves), metric=metric)
        if title:
            fig.suptitle(title, fontsize=10)
        return fig
    from matplotlib.figure import Figure

    if fractions is None:
        raise TensorLensError("plot_perturbation_curves: a mapping of curves needs fractions=")
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ys = list(_np(ys).reshape(-1))
        if len(ys) != len(fractions):
            raise TensorLensError(f"curve '{name}' has {len(ys)} values for {len(fractions)} fractions")
        style = "-" if name.startswith("tensor") else "--"
        ax.plot([100 * f for f in fractions], ys, style, marker="o", ms=3, label=name)
    ax.set_xlabel("% of tokens masked")
    ax.set_ylabel(metric)
    ax.set_title(title or "perturbation curves", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _plot_summaries(summaries: Sequence[Any], *, metric: str = "accuracy") -> Any:
    """Mean perturbation curves of :class:`~tl_tensorlens.evaluation.perturbation.MethodSummary` rows, one
    panel per order; returns a matplotlib Figure (not shown)."""
    import matplotlib
    from matplotlib.figure import Figure

    dirs = [d for d in ("positive", "negative") if any(s.order == d for s in summaries)]
    fig = Figure(figsize=(5.5 * len(dirs) + 1.8, 4.2), layout="constrained")
    axes = fig.subplots(1, len(dirs), squeeze=False)[0]
    # One fixed, distinct colour per method (the default 10-colour cycle repeats past 10 methods).
    methods = list(dict.fromkeys(s.method for s in summaries))
    palette = matplotlib.colormaps["tab20"]
    colour = {m: palette(i % 20) for i, m in enumerate(methods)}
    for ax, d in zip(axes, dirs, strict=True):
        for s in summaries:
            if s.order != d:
                continue
            y = s.accuracy_curve if metric == "accuracy" else s.prob_curve
            style = "-" if s.method.startswith("tensor") else (":" if s.method == "random" else "--")
            ax.plot([100 * f for f in s.fractions], y, style, color=colour[s.method], marker="o", ms=3, label=s.method)
        ax.set_title(f"{d} perturbation")
        ax.set_xlabel("% of tokens masked")
        ax.set_ylabel("prediction unchanged" if metric == "accuracy" else "p(original prediction)")
        ax.grid(alpha=0.3)
    # Outside the panels: with a dozen methods a legend inside always hides some curve.
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def plot_relation_results(
    rows: Iterable[dict[str, Any]],
    *,
    metric: str = "faithfulness",
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """Grouped bars per relation (mean over splits, error bar = std), with the random-guess level.

    Args:
        rows: Result rows of :func:`run_relation_study` (or :func:`load_results`).
        metric: Row field to plot.
        methods: Methods to show, in order (default: all, in first-seen order).
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (never shown).

    Example:
        >>> rows = [{"relation": "r", "method": m, "status": "ok", "faithfulness": f, "random": 0.5,
        ...          "n_test": 4, "split": 0} for m, f in [("mean_tensor", 1.0), ("lre_b1", 0.5)]]
        >>> fig = plot_relation_results(rows)
        >>> type(fig).__name__
        'Figure'
    """
    from matplotlib.figure import Figure  # optional dependency, imported only here

    from tl_tensorlens.evaluation.relations.decoding import ok_methods, summarize_results

    rows = list(rows)
    summary = summarize_results(rows, metric)
    if methods is None:
        methods = ok_methods(rows)
    relations = sorted(summary)
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(max(6.0, 0.9 * len(relations) * max(len(methods), 1) * 0.5 + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        xs, means, stds = [], [], []
        for j, rel in enumerate(relations):
            if method in summary[rel]["methods"]:
                mean, std, _ = summary[rel]["methods"][method]
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(mean)
                stds.append(std)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=method)
    for j, rel in enumerate(relations):
        # "_nolegend_" keeps one legend entry for all relations' chance levels.
        label = "random guess" if j == 0 else "_nolegend_"
        ax.hlines(summary[rel]["random"], j - 0.45, j + 0.45, colors="black", linestyles="dashed", label=label)
    ax.set_xticks(range(len(relations)), relations, rotation=45, ha="right")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_relation_comparison(
    rows: Iterable[dict[str, Any]],
    *,
    reference: str = "mean_tensor",
    others: Sequence[str] | None = None,
    metric: str = "faithfulness",
    title: str | None = None,
) -> Any:
    """One panel per compared method: each relation is a point (x: the method's score, y: the
    reference's, means over splits), coloured by relation type, with the diagonal; points above it are
    relations where the reference scores higher. Readable with dozens of relations, where grouped bars
    are not.

    Returns:
        A ``matplotlib.figure.Figure`` (never shown).

    Example:
        >>> rows = [{"relation": r, "relation_type": "t", "method": m, "status": "ok", "faithfulness": f,
        ...          "random": 0.5, "n_test": 4, "split": 0}
        ...         for r in ("a", "b") for m, f in [("mean_tensor", 0.8), ("lre_b1", 0.5)]]
        >>> len(plot_relation_comparison(rows).axes)
        1
    """
    from matplotlib.figure import Figure

    from tl_tensorlens.evaluation.relations.decoding import ok_methods, summarize_results

    rows = list(rows)
    summary = summarize_results(rows, metric)
    types = {r["relation"]: r.get("relation_type") or "?" for r in rows}
    if others is None:
        others = [m for m in ok_methods(rows) if m != reference]
    kinds = sorted(set(types.values()))
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    n = max(len(others), 1)
    cols = min(n, 4)
    grid = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.2 * grid + 0.4), layout="constrained")
    for i, m in enumerate(others):
        ax = fig.add_subplot(grid, cols, i + 1)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        for kind in kinds:
            pts = [
                (summary[r]["methods"][m][0], summary[r]["methods"][reference][0])
                for r in summary
                if types.get(r) == kind and m in summary[r]["methods"] and reference in summary[r]["methods"]
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=14, color=colors[kind], label=kind)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{m} {metric}", fontsize=8)
        ax.set_ylabel(f"{reference} {metric}", fontsize=8)
        ax.set_aspect("equal")
        if i == 0:
            ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    return fig


def plot_head_summary(
    contributions: Float[Tensor, "layer head"],
    *,
    title: str = "",
    highlight: Sequence[tuple[int, int]] = (),
    cbar_label: str = "contribution",
) -> Any:
    """A layer × head heatmap of per-head values (e.g. each head's contribution to one logit).

    Signed values get a diverging map centred at 0. Cells are annotated with their value when they
    are large enough to read; ``highlight`` cells (e.g. the top heads) get a black frame.

    Example:
        >>> import torch
        >>> fig = plot_head_summary(torch.randn(3, 4), title="heads", highlight=[(0, 1)])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['L0', 'L1', 'L2']
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    a = _np(contributions)
    if a.ndim != 2:
        raise TensorLensError(f"plot_head_summary: expected [layer, head], got shape {a.shape}")
    n_layers, n_heads = a.shape
    fig = Figure(figsize=(min(14.0, 2.6 + 0.62 * n_heads), min(14.0, 1.4 + 0.3 * n_layers)), layout="constrained")
    ax = fig.add_subplot()
    norm, cmap = _norm_for(a, None)
    im = ax.imshow(a, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_heads), labels=[f"H{h}" for h in range(n_heads)], fontsize=8)
    ax.set_yticks(
        range(n_layers), labels=[f"L{layer}" for layer in range(n_layers)], fontsize=_fontsize(n_layers) * 0.9
    )
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    if n_heads <= 16 and n_layers <= 40:
        for layer in range(n_layers):
            for h in range(n_heads):
                v = a[layer, h]
                dark = abs(norm(v) - 0.5) > 0.35
                ax.text(
                    h, layer, f"{v:.2g}", ha="center", va="center", fontsize=5.5, color="white" if dark else "black"
                )
    for layer, h in highlight:
        ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.4))
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.05)
    cb.set_label(cbar_label, fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return fig


def plot_top_heads(
    rows: Float[Tensor, "k pos_in"],
    tokens: Sequence[str],
    *,
    labels: Sequence[str],
    title: str = "",
    apart: Sequence[int] = (),
    cbar_label: str = "contribution via each source token",
    signed: bool | None = True,
    xlabel: str = "source token",
) -> Any:
    """Ranked heads as stacked strips: one row per head (e.g. its contribution split over source
    tokens), all on one shared colour scale so rows compare; ``apart`` columns as in
    :func:`plot_map`, their values written in the cells.

    Example:
        >>> import torch
        >>> fig = plot_top_heads(torch.randn(2, 3), list("abc"), labels=["1. L0H1", "2. L1H0"])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['1. L0H1', '2. L1H0']
    """
    import numpy as np
    from matplotlib.figure import Figure

    a = _np(rows)
    if a.ndim != 2 or a.shape[1] != len(tokens):
        raise TensorLensError(f"plot_top_heads: rows of shape {a.shape} for {len(tokens)} tokens")
    if len(labels) != a.shape[0]:
        raise TensorLensError(f"plot_top_heads: {a.shape[0]} rows but {len(labels)} labels")
    n = len(tokens)
    apart = [c for c in apart if 0 <= c < n]
    fig = Figure(figsize=(min(18.0, 4.5 + 0.55 * n), 1.3 + 0.38 * a.shape[0]), layout="constrained")
    ax = fig.add_subplot()
    kept = _kept(a, apart)
    norm, cmap = _norm_for(kept, signed)
    im = ax.imshow(kept, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _overlay_apart(ax, a, apart)
    for r in range(a.shape[0]):
        for c in apart:
            if np.isfinite(a[r, c]):
                ax.text(c, r, f"{a[r, c]:+.2g}", ha="center", va="center", fontsize=6, color="black")
    ax.set_yticks(range(a.shape[0]), labels=list(labels), fontsize=8)
    ax.set_xticks(range(n), labels=_labels(tokens, apart), rotation=90, fontsize=_fontsize(n))
    ax.set_xlabel(xlabel + (f"  ({SINK_MARK}: drawn apart, value written in the cell)" if apart else ""), fontsize=8)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    cb.set_label(cbar_label + (" (without ⚓)" if apart else ""), fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return fig


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def has_matplotlib() -> bool:
    """True when matplotlib can be imported (checked by importing it; it is never imported at module
    import time, and a broken install counts as missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def has_circuitsvis() -> bool:
    """True when circuitsvis can be imported (it is never imported at module import time)."""
    import importlib.util

    return importlib.util.find_spec("circuitsvis") is not None


def _cv_html(rendered: Any) -> str:
    # local_src inlines the JavaScript bundle, so the page works without network access
    # (str(rendered) would load it from a CDN).
    return str(getattr(rendered, "local_src", rendered))


def attention_html(maps: Mapping[str, Any], tokens: Sequence[str], *, use_circuitsvis: bool | None = None) -> str:
    """Interactive HTML of N×N maps, one "head" per method or layer.

    With circuitsvis installed this is ``circuitsvis.attention.attention_heads`` (each map scaled to
    ``[-1, 1]`` by its maximum absolute value, negative values in blue, one "head" per map);
    otherwise a self-contained table per map (no scripts, no network).
    """
    if not maps:
        raise TensorLensError("attention_html: no maps")
    arrays = {name: _check_map(m, tokens, f"attention_html[{name}]") for name, m in maps.items()}
    if use_circuitsvis is None:
        use_circuitsvis = has_circuitsvis()
    if use_circuitsvis:
        import numpy as np
        from circuitsvis.attention import attention_heads

        stack = np.stack([np.nan_to_num(a) / max(float(np.nanmax(np.abs(a))), 1e-300) for a in arrays.values()])
        rendered = attention_heads(
            attention=stack,
            tokens=list(tokens),
            attention_head_names=list(arrays),
            min_value=-1.0,
            max_value=1.0,
            negative_color="blue",
            positive_color="red",
        )
        return _cv_html(rendered)
    parts = []
    for name, a in arrays.items():
        parts.append(f"<h3>{html.escape(name)}</h3>" + _html_table(a, tokens))
    return "\n".join(parts)


def relevance_html(
    relevance: Float[Tensor, " pos_in"], tokens: Sequence[str], *, use_circuitsvis: bool | None = None
) -> str:
    """Tokens coloured by relevance (circuitsvis ``colored_tokens`` when installed)."""
    a = _np(relevance).reshape(-1)
    if a.shape[0] != len(tokens):
        raise TensorLensError(f"relevance_html: {a.shape[0]} values but {len(tokens)} tokens")
    if use_circuitsvis is None:
        use_circuitsvis = has_circuitsvis()
    if use_circuitsvis:
        from circuitsvis.tokens import colored_tokens

        return _cv_html(colored_tokens(tokens=list(tokens), values=[float(v) for v in a]))
    m = max(float(abs(a).max()), 1e-300)
    spans = [
        f'<span class="tok" style="background:{_rgb(v / m)}" title="{v:.4g}">{html.escape(t)}</span>'
        for t, v in zip(tokens, a.tolist(), strict=True)
    ]
    return '<div class="strip">' + " ".join(spans) + "</div>"


def _rgb(v: float) -> str:
    """Diverging colour of ``v`` in [-1, 1] (blue-white-red)."""
    v = max(-1.0, min(1.0, float(v)))
    if v >= 0:
        return f"rgb(255,{int(255 * (1 - v))},{int(255 * (1 - v))})"
    return f"rgb({int(255 * (1 + v))},{int(255 * (1 + v))},255)"


def _html_table(a: Any, tokens: Sequence[str]) -> str:
    import numpy as np

    m = max(float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0, 1e-300)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tokens)
    body = []
    for i in range(a.shape[0]):
        cells = "".join(
            f'<td style="background:{_rgb(a[i, j] / m)}" title="{html.escape(tokens[i])} ← {html.escape(tokens[j])}: {a[i, j]:.4g}"></td>'
            for j in range(a.shape[1])
        )
        body.append(f"<tr><th>{html.escape(tokens[i]) if i < len(tokens) else i}</th>{cells}</tr>")
    return f'<table class="map"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def maps_to_json(maps: Mapping[str, Any]) -> str:
    """JSON of named maps (lists of floats, NaN as null)."""
    import numpy as np

    def clean(a: Any) -> Any:
        a = _np(a)
        return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.atleast_2d(a)]

    return json.dumps({k: clean(v) for k, v in maps.items()})


__all__ = [
    "SINK_MARK",
    "attention_html",
    "display_label",
    "has_circuitsvis",
    "has_matplotlib",
    "maps_to_json",
    "plot_component_patching",
    "plot_head_summary",
    "plot_logit_lens",
    "plot_map",
    "plot_map_grid",
    "plot_method_comparison",
    "plot_patching",
    "plot_perturbation_curves",
    "plot_relation_comparison",
    "plot_relation_results",
    "plot_relevance_strip",
    "plot_top_heads",
    "relevance_html",
    "token_labels",
]
