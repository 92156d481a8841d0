"""The ``explain`` report: one prompt through TensorLens, written as PNGs, an HTML page and JSON.

:func:`explain` captures the prompt once and writes into one folder:

* ``maps.json``: the prompt, the model's prediction per position, every N×N map (tensor collapses
  Norm, In+Out and Logit of the model's own prediction, plus registered baselines), the per-layer
  and per-head maps, each head's contribution to the prediction, the positions drawn apart
  (attention sinks) with their values, and the tensor logit lens;
* ``methods.png`` (the maps side by side), ``relevance.png`` (the read position's row of every
  method), ``layers.png`` (each block's Norm collapse; the read position's row only for models with
  more than :data:`PAGED_LAYERS` layers), ``head_summary.png`` (layer × head contribution to the
  prediction's logit), ``top_heads.png`` (the top heads ranked, split over their source tokens),
  ``heads.png`` (each head's ``|A_h| ‖W_V W_O‖_F``; one page per layer under ``heads/`` for models
  with more than :data:`PAGED_LAYERS` layers), ``logit_lens.png`` (tensor logit lens at the read
  position);
* ``index.html``: one page (top-level images inlined, the per-layer head pages linked from
  collapsible sections, an interactive map explorer in plain JavaScript, no network access), and
  ``interactive.html`` through circuitsvis when installed.

Attention sinks (the first token of a decoder takes most of the attention of every later position,
BOS or not) would saturate every map: by default they are drawn apart and left out of the colour
scales (``sink=``); their values stay in ``maps.json`` and are listed in the page.

Nothing is written outside the output folder.
"""

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_tensorlens._backend import default_output, has_unembedding
from tl_tensorlens._deprecation import warn_deprecated
from tl_tensorlens.capture import capture
from tl_tensorlens.errors import ArgumentError, MissingDependencyError, TensorLensError
from tl_tensorlens.replay import verify_replay
from tl_tensorlens.tensors import TensorLens

#: The tensor collapses of the registry (``tensor_in_class`` explains the model's own prediction).
TENSOR_MAPS: tuple[str, ...] = ("tensor_norm", "tensor_in_out", "tensor_in_class")
DEFAULT_METHODS: tuple[str, ...] = (
    "tensor_norm",
    "tensor_in_out",
    "tensor_in_class",
    "attn_rollout",
    "globenc_rollout",
    "alti_rollout",
)


#: ``sink=`` modes: ``"auto"`` draws the first position and every detected attention sink apart,
#: ``"first"`` only the first position, ``"include"`` nothing (one colour scale for all).
SINK_MODES: tuple[str, ...] = ("auto", "first", "include")
#: A position receiving at least this mean attention share (over layers, heads, later queries) is a sink.
SINK_THRESHOLD = 0.3
#: Above this many layers the per-head maps go to one page per layer (``heads/layer_XX.png``).
PAGED_LAYERS = 8


def sink_positions(state: Any, mode: str = "auto", threshold: float = SINK_THRESHOLD) -> list[int]:
    """The positions :func:`explain` draws apart from the colour scales (see :data:`SINK_MODES`).

    Raises:
        ArgumentError: an unknown mode.
    """
    from tl_tensorlens.methods.heads import detect_sinks

    if mode not in SINK_MODES:
        raise ArgumentError("sink", mode, f"one of {SINK_MODES}")
    if mode == "include":
        return []
    if mode == "first":
        return [0]
    return sorted({0, *detect_sinks(state, threshold)})


@dataclass(frozen=True)
class ExplainReport:
    """What :func:`explain` wrote.

    Attributes:
        out: the report folder.
        files: every file written (relative to ``out``).
        tokens: token labels of the prompt.
        maps: method -> ``[pos_out, pos_in]`` map.
        position: the output position the relevance strip and logit lens read.
        prediction: the model's top-1 next token at ``position`` (label).
        notes: methods skipped and why.
        sinks: positions drawn apart from the colour scales (``sink=``).
        top_heads: ``(layer, head, contribution)`` of the heads contributing most to the prediction's
            logit at ``position``, largest magnitude first (decoders with ``per_head``).
    """

    out: Path
    files: tuple[str, ...]
    tokens: tuple[str, ...]
    maps: dict[str, Tensor]
    position: int
    prediction: str
    notes: tuple[str, ...] = field(default=())
    sinks: tuple[int, ...] = field(default=())
    top_heads: tuple[tuple[int, int, float], ...] = field(default=())


def available_methods() -> list[str]:
    """Methods :func:`explain` accepts: every registered relevance method, tensor collapses first."""
    from tl_tensorlens.methods import list_methods

    return list(TENSOR_MAPS) + [m for m in list_methods() if m not in TENSOR_MAPS]


def resolve_methods(methods: Sequence[str]) -> list[str]:
    """The report's method names checked against the registry, deprecated names mapped to new ones.

    Raises:
        ArgumentError: a name is not registered, or ``methods`` is empty.
    """
    out = []
    for m in methods:
        if m == "tensor_logit":
            warn_deprecated("method name 'tensor_logit'", "'tensor_in_class'", stacklevel=4)
            m = "tensor_in_class"
        out.append(m)
    known = available_methods()
    unknown = [m for m in out if m not in known]
    if unknown:
        raise ArgumentError("methods", unknown, f"registered methods: {', '.join(known)}")
    if not out:
        raise ArgumentError("methods", [], "at least one method")
    return out


def _vocab_label(model: Any, token_id: int) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return f"#{token_id}"
    return tok.decode([token_id]).strip() or repr(tok.decode([token_id]))


def _png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _finite(a: Tensor) -> list[list[float | None]]:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in a.detach().double().cpu().tolist()]


NO_PICTURES_NOTE = "no PNG pictures: matplotlib is not installed (pip install 'tl-tensorlens[plot]')"


class _NoPictures:
    """Stands in for :mod:`tl_tensorlens.viz.plots` when pictures are off: ``plot_*`` return None."""

    def __init__(self, plots: Any):
        self._plots = plots

    def has_circuitsvis(self) -> bool:
        return self._plots.has_circuitsvis()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("plot_"):
            return lambda *args, **kwargs: None
        return getattr(self._plots, name)


def explain(
    model: Any,
    prompt: Any,
    out: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    position: int = -1,
    model_name: str = "model",
    per_layer: bool = True,
    per_head: bool = True,
    logit_lens: bool = True,
    interactive: bool | None = None,
    verify: bool = True,
    pictures: bool | None = None,
    answer: str | None = None,
    sink: str = "auto",
    top_heads: int = 12,
) -> ExplainReport:
    """Explain one prompt: every map, pictures, an HTML page and JSON, written under ``out``.

    Args:
        model: a TransformerLens model (decoder or encoder).
        prompt: a string (needs ``model.tokenizer``) or token ids ``[pos]`` / ``[1, pos]``.
        out: report folder (created; existing files of the same names are overwritten).
        methods: names from :func:`available_methods`; baselines that fail on this model are
            skipped with a note.
        position: output position of the relevance strip and the logit lens.
        model_name: shown in the report.
        per_layer: also write each block's Norm collapse.
        per_head: also write each head's factored Norm collapse.
        logit_lens: also write the tensor logit lens (decoders only).
        interactive: write ``interactive.html`` with circuitsvis (None: when installed).
        verify: check first that the frozen replay reproduces the model and is affine on this prompt
            (the tensor maps would be wrong otherwise): a failure raises
            :class:`~tl_tensorlens.errors.VerificationError` and nothing is written. The numbers go into
            the report. ``verify=False`` skips the check and says so in the report.
        pictures: write the PNGs (matplotlib, the ``plot`` extra). None: when matplotlib is installed;
            without it ``index.html`` and ``maps.json`` are still written, with a note.
        answer: decoders: an expected answer string (e.g. ``" Paris"``) whose rank the prediction
            summary reports beside the top-10 tokens (:func:`~tl_tensorlens.viz.summary.prediction_summary`).
        sink: which input positions are drawn apart (hatched, grey, own scale, marked ``⚓``) and left
            out of every colour scale, so that an attention sink does not saturate the maps:
            ``"auto"`` (the first position and every position receiving on average at least
            :data:`SINK_THRESHOLD` of the attention of later positions), ``"first"``, or
            ``"include"`` (none). Their values stay in ``maps.json`` and are listed in the page.
        top_heads: how many heads the ranked head view shows (decoders): each head's contribution
            to the logit of the prediction at ``position`` (:func:`~tl_tensorlens.methods.heads.
            head_contributions`), split over source tokens. Models with more than
            :data:`PAGED_LAYERS` layers get one per-head page per layer instead of one grid.

    Returns:
        An :class:`ExplainReport`.

    Raises:
        ArgumentError: unknown method, position out of range, unknown sink mode, top_heads < 1.
        VerificationError: the replay does not reproduce the model on this prompt (or is not finite).
        MissingDependencyError: ``pictures=True`` and matplotlib (the ``plot`` extra) is missing.

    Example:
        >>> import tempfile, torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> rep = explain(model, torch.tensor([1, 2, 3]), tempfile.mkdtemp(),
        ...               methods=["tensor_norm"], interactive=False)
        >>> "index.html" in rep.files and "maps.json" in rep.files
        True
    """
    from tl_tensorlens.methods import get_method, method_info
    from tl_tensorlens.viz import plots as plotting

    if pictures is None:
        pictures = plotting.has_matplotlib()
    elif pictures and not plotting.has_matplotlib():
        raise MissingDependencyError("explain(pictures=True) needs matplotlib: pip install 'tl-tensorlens[plot]'")
    if not pictures:
        plotting = _NoPictures(plotting)  # every plot_* call returns None; save() skips it

    methods = resolve_methods(methods)
    if sink not in SINK_MODES:
        raise ArgumentError("sink", sink, f"one of {SINK_MODES}")
    from tl_tensorlens._checks import as_int

    top_k = as_int("top_heads", top_heads, lo=1)
    out = Path(out)
    state = capture(model, prompt)
    n = state.n_pos
    from tl_tensorlens._checks import as_position

    p = as_position("position", position, n)
    decoder = has_unembedding(model)
    notes: list[str] = [] if pictures else [NO_PICTURES_NOTE]
    check_json: dict[str, Any] | None = None
    if verify:
        (check,) = verify_replay(model, state, outputs=(default_output(model),))
        check_json = {
            "output": check.output,
            "reproduction_error": check.reproduction_error,
            "affine_error": check.affine_error,
            "tolerance": check.tolerance,
            "reproduction_tolerance": check.reproduction_tolerance,
        }
    else:
        notes.append("the frozen replay was not verified on this prompt (verify=False): maps may not be exact")
    out.mkdir(parents=True, exist_ok=True)
    tokens = plotting.token_labels(model, state.tokens[0])
    prediction = state.logits[0].argmax(-1) if (decoder and state.logits is not None) else None

    maps: dict[str, Tensor] = {}
    for name in methods:
        info = method_info(name)
        if info.class_specific and prediction is None:
            notes.append(f"{name}: skipped (class-specific: needs a decoder's prediction to explain)")
            continue
        try:
            target = prediction if info.class_specific else None
            maps[name] = get_method(name)(model, state, target=target).detach()
        except TensorLensError as e:
            if info.family == "tensor":
                raise
            notes.append(f"{name}: skipped ({e})")

    files: list[str] = []

    def save(fig: Any, name: str) -> None:
        if fig is None:  # pictures off
            return
        fig.savefig(out / name, dpi=110)
        files.append(name)

    pred_label = _vocab_label(model, int(prediction[p])) if prediction is not None else ""
    from tl_tensorlens.methods.heads import attention_received

    sinks = sink_positions(state, sink)
    received = attention_received(state)
    signed_note = "red: positive, blue: negative"
    apart_note = f"; ⚓ {', '.join(repr(tokens[j]) for j in sinks)} drawn apart (own grey scale)" if sinks else ""
    save(
        plotting.plot_method_comparison(
            maps, tokens, title=f"{model_name}: relevance maps ({signed_note}{apart_note})", apart=sinks
        ),
        "methods.png",
    )
    save(
        plotting.plot_method_comparison(
            maps,
            tokens,
            position=p,
            title=f"what drives position {p} ('{plotting.display_label(tokens[p])}')"
            + (f" → predicts '{plotting.display_label(pred_label)}'" if pred_label else ""),
            apart=sinks,
        ),
        "relevance.png",
    )
    many_layers = state.n_layers > PAGED_LAYERS
    layer_maps: list[Tensor] = []
    layer_rows = list(range(n))
    if per_layer:
        base = TensorLens.from_state(model, state)
        if many_layers:
            # one row per block (the read position): 1/n of the VJPs, and one readable picture
            layer_rows = [p]
            layer_maps = [base.block(layer).collapse("norm", positions=[p]) for layer in range(state.n_layers)]
            save(
                plotting.plot_top_heads(
                    torch.cat(layer_maps),
                    tokens,
                    labels=[f"block {layer}" for layer in range(state.n_layers)],
                    title=f"per-block tensor at position {p} ('{plotting.display_label(tokens[p])}'), Norm collapse "
                    "‖T_l[p,:,j,:]‖_F (each block's input → its output; the read position itself, which holds "
                    "the skip connection, drawn apart too)",
                    apart=sorted({*sinks, p}),
                    signed=False,
                    cbar_label="Frobenius norm",
                    xlabel="input token",
                ),
                "layers.png",
            )
        else:
            layer_maps = [base.block(layer).collapse("norm") for layer in range(state.n_layers)]
            save(
                plotting.plot_map_grid(
                    layer_maps,
                    tokens,
                    titles=[f"block {layer}" for layer in range(state.n_layers)],
                    title="per-block tensor, Norm collapse ‖T_l[i,:,j,:]‖_F" + apart_note,
                    cbar_label="Frobenius norm",
                    apart=sinks,
                ),
                "layers.png",
            )
    head_maps: list[Tensor] = []
    head_titles: list[str] = []
    heads_json: dict[str, Any] | None = None
    head_pages: list[str] = []
    top: list[tuple[int, int, float]] = []
    if per_head:
        from tl_tensorlens.methods.heads import head_contributions

        base = TensorLens.from_state(model, state)
        n_heads = int(state.pattern(0).shape[0])
        hc = None
        if prediction is not None:
            hc = head_contributions(model, state, position=p, token=int(prediction[p]))
            top = hc.top(top_k)
            total = float(hc.contributions.abs().sum()) or 1.0
            save(
                plotting.plot_head_summary(
                    hc.contributions,
                    title=f"each head's contribution to the logit of '{plotting.display_label(pred_label)}' at "
                    f"position {p} (frozen model; framed: top {len(top)})",
                    highlight=[(layer, h) for layer, h, _ in top],
                    cbar_label="contribution to the logit",
                ),
                "head_summary.png",
            )
            labels = [
                f"{r + 1}. L{layer}H{h}  {c:+.3g} ({100 * abs(c) / total:.0f}%)" for r, (layer, h, c) in enumerate(top)
            ]
            save(
                plotting.plot_top_heads(
                    torch.stack([hc.by_source[layer, h] for layer, h, _ in top]),
                    tokens,
                    labels=labels,
                    title=f"top {len(top)} heads by |contribution| to '{plotting.display_label(pred_label)}', "
                    "split over the source tokens they read",
                    apart=sinks,
                ),
                "top_heads.png",
            )
            heads_json = {
                "position": p,
                "token": hc.token,
                "token_label": pred_label,
                "logit": hc.value,
                "contributions": _finite(hc.contributions),
                "by_source": {
                    f"L{layer}H{h}": [float(v) for v in hc.by_source[layer, h]]
                    for layer in range(state.n_layers)
                    for h in range(n_heads)
                },
                "top": [{"layer": layer, "head": h, "contribution": c} for layer, h, c in top],
            }
        else:
            notes.append("head contributions: skipped (they explain a decoder's prediction)")

        def head_title(layer: int, h: int) -> str:
            return f"L{layer}H{h}" + (f" ({float(hc.contributions[layer, h]):+.2g})" if hc is not None else "")

        for layer in range(state.n_layers):
            for h in range(n_heads):
                head_maps.append(base.head(layer, h).norm_collapse())
                head_titles.append(f"L{layer}H{h}")
        head_title_text = "per-head tensor A_h ⊗ W_OVᵀ, Norm collapse |A_h[i,j]|·‖W_V W_O‖_F" + (
            " (in brackets: contribution to the prediction's logit)" if hc is not None else ""
        )
        if not many_layers:
            save(
                plotting.plot_map_grid(
                    head_maps,
                    tokens,
                    titles=[head_title(layer, h) for layer in range(state.n_layers) for h in range(n_heads)],
                    ncols=n_heads,
                    title=head_title_text + apart_note,
                    cbar_label="Frobenius norm",
                    apart=sinks,
                ),
                "heads.png",
            )
        else:
            (out / "heads").mkdir(exist_ok=True)
            ncols = math.ceil(math.sqrt(n_heads))
            for layer in range(state.n_layers):
                name = f"heads/layer_{layer:02d}.png"
                fig = plotting.plot_map_grid(
                    head_maps[layer * n_heads : (layer + 1) * n_heads],
                    tokens,
                    titles=[head_title(layer, h) for h in range(n_heads)],
                    ncols=ncols,
                    title=f"layer {layer}: per-head |A_h[i,j]|·‖W_V W_O‖_F, one colour scale"
                    + (" (brackets: contribution to the logit)" if hc is not None else "")
                    + ("; ⚓ drawn apart" if sinks else ""),
                    cbar_label="Frobenius norm",
                    apart=sinks,
                    cell=min(3.2, 2.0 + 0.07 * n),
                    shared_scale=True,
                )
                fig.savefig(out / name, dpi=80)
                files.append(name)
                head_pages.append(name)
    ll_json: dict[str, Any] | None = None
    if logit_lens and decoder:
        from tl_tensorlens.methods.logit_lens import tensor_logit_lens

        ll = tensor_logit_lens(model, state, positions=[p])
        vocab = {int(t): _vocab_label(model, int(t)) for t in torch.cat([ll.target.reshape(-1), ll.tl_top.reshape(-1)])}
        vlist = [vocab.get(i, f"#{i}") for i in range(max(vocab) + 1)]
        save(plotting.plot_logit_lens(ll, tokens, position=p, vocab=vlist, apart=sinks), "logit_lens.png")
        ll_json = {
            "position": p,
            "layers": list(ll.depths),
            "target": [vocab[int(t)] for t in ll.target[:, 0]],
            "tl_top": [vocab[int(t)] for t in ll.tl_top[:, 0]],
            "maps": _finite(ll.maps[:, 0]),
            "bias": [float(b) for b in ll.bias[:, 0]],
            "tl_logits": [float(v) for v in ll.tl_logits[:, 0]],
            "max_error_vs_transformer_lens": ll.max_error,
        }

    payload = {
        "model": model_name,
        "tokens": tokens,
        "token_ids": [int(t) for t in state.tokens[0]],
        "position": p,
        "prediction": [_vocab_label(model, int(t)) for t in prediction] if prediction is not None else None,
        "maps": {k: _finite(v) for k, v in maps.items()},
        "layers": [_finite(m) for m in layer_maps],
        "layers_positions": layer_rows if layer_maps else [],
        "heads": {t: _finite(m) for t, m in zip(head_titles, head_maps, strict=True)},
        "head_contributions": heads_json,
        "sinks": {
            "mode": sink,
            "threshold": SINK_THRESHOLD,
            "positions": sinks,
            "attention_received": [float(v) for v in received],
            "at_position": {
                k: {str(j): _finite(v[p : p + 1, j : j + 1])[0][0] for j in sinks} for k, v in maps.items()
            },
        },
        "logit_lens": ll_json,
        "replay_check": check_json,
        "notes": notes,
    }
    (out / "maps.json").write_text(json.dumps(payload))
    files.append("maps.json")

    if interactive is None:
        interactive = plotting.has_circuitsvis()
    if interactive:
        body = plotting.attention_html(maps, tokens, use_circuitsvis=True)
        (out / "interactive.html").write_text(_page(f"{model_name}: interactive maps", body, script=""))
        files.append("interactive.html")

    pngs = [f for f in files if f.endswith(".png") and f not in head_pages]
    (out / "index.html").write_text(_index_html(out, payload, pngs, interactive, head_pages))
    files.append("index.html")
    if decoder:
        _add_prediction_summary(out, model, state, p, answer)
    return ExplainReport(out, tuple(files), tuple(tokens), maps, p, pred_label, tuple(notes), tuple(sinks), tuple(top))


def _add_prediction_summary(out: Path, model: Any, state: Any, position: int, answer: str | None) -> None:
    """Add the ``test_prompt``-style summary (top-10, rank of ``answer``) to ``maps.json`` and ``index.html``."""
    from tl_tensorlens.viz.summary import prediction_summary

    summary = prediction_summary(model, state, position=position, k=10, answer=answer)
    data = json.loads((out / "maps.json").read_text())
    data["prediction_summary"] = summary.to_json()
    (out / "maps.json").write_text(json.dumps(data))
    page = (out / "index.html").read_text()
    page = page.replace("<h2>Explore</h2>", summary.to_html() + "<h2>Explore</h2>", 1)
    (out / "index.html").write_text(page)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
img{max-width:100%;border:1px solid #ddd}
.tok{padding:2px 4px;margin:1px;border-radius:3px;display:inline-block;cursor:pointer;font-family:monospace}
.tok.sel{outline:2px solid #000}
table.map{border-collapse:collapse;font-size:11px}table.map td{width:14px;height:14px}
table.map th{font-weight:normal;font-family:monospace;padding:0 3px}
.note{color:#666;font-size:.9em}
.tok.sink{background:repeating-linear-gradient(45deg,#eee,#eee 4px,#ddd 4px,#ddd 8px)!important;outline:1px dashed #b07000}
table.heads{border-collapse:collapse;font-size:.9em}table.heads td,table.heads th{border:1px solid #ddd;padding:2px 6px}
table.heads td.num{text-align:right;font-family:monospace}
details{margin:.3em 0}summary{cursor:pointer}
"""

_JS = """
const R = JSON.parse(document.getElementById('data').textContent);
function rgb(v){v=Math.max(-1,Math.min(1,v));const c=Math.round(255*(1-Math.abs(v)));
  return v>=0?`rgb(255,${c},${c})`:`rgb(${c},${c},255)`;}
function show(){
  const m = document.getElementById('method').value, i = +document.getElementById('pos').value;
  const row = R.maps[m][i]; let mx = 1e-300; const sinks = new Set(R.sinks);
  row.forEach((v,j)=>{if(v!==null && !sinks.has(j)) mx=Math.max(mx,Math.abs(v));});
  const strip = document.getElementById('strip'); strip.innerHTML='';
  R.tokens.forEach((t,j)=>{const s=document.createElement('span'); s.className='tok'+(j===i?' sel':'');
    const v=row[j]; s.title = v===null?'n/a':v.toPrecision(4);
    if(sinks.has(j)){s.className+=' sink'; s.textContent='\u2693'+t+(v===null?'':` (${(v/mx).toPrecision(2)}\u00d7)`);}
    else{s.style.background = v===null?'#ddd':rgb(v/mx); s.textContent=t;}
    s.onclick=()=>{document.getElementById('pos').value=j; show();};
    strip.appendChild(s);});
  document.getElementById('rowinfo').textContent =
    `method ${m}, output position ${i} ('${R.tokens[i]}')` + (R.prediction?` predicts '${R.prediction[i]}'`:'') +
    ` — max |relevance| ${mx.toPrecision(3)}` + (R.sinks.length?' (without \u2693, shown as multiples of it)':'') +
    '; click a token to read its row';
}
const sel = document.getElementById('method');
Object.keys(R.maps).forEach(k=>{const o=document.createElement('option'); o.value=k; o.textContent=k; sel.appendChild(o);});
const pos = document.getElementById('pos');
R.tokens.forEach((t,j)=>{const o=document.createElement('option'); o.value=j; o.textContent=`${j}: ${t}`; pos.appendChild(o);});
pos.value = R.position; sel.onchange = show; pos.onchange = show; show();
document.body.dataset.rendered = 'ok';
"""


def _page(title: str, body: str, *, script: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>"
    )


_CAPTIONS = {
    "methods.png": "Every method's N×N map (rows: output position, columns: input position; grey: above the "
    "diagonal of a causal model).",
    "relevance.png": "The read position's row of every method, each scaled to its own maximum.",
    "layers.png": "Each block's own tensor (its input → its output), Norm collapse.",
    "heads.png": "Each head's tensor A_h ⊗ (W_V W_O)ᵀ, Norm collapse (pattern times the OV norm).",
    "head_summary.png": "Layer × head: each head's contribution to the logit of the prediction at the read position "
    "(the part of that logit passing through the head in the frozen model: zeroing the head there lowers the "
    "logit by exactly this much; heads of one layer add up, layers do not, since paths through several "
    "layers count in each).",
    "top_heads.png": "The heads with the largest |contribution|, ranked, each split over the source tokens it "
    "reads (rows sum to the contribution; one shared colour scale).",
    "logit_lens.png": "Tensor logit lens: per layer, which inputs drive the logit-lens prediction at the read "
    "position (rows sum, with the bias, to TransformerLens' logit-lens logit).",
}


def _sink_section(payload: dict[str, Any]) -> str:
    sk = payload["sinks"]
    if not sk["positions"]:
        return (
            "<p class='note'>One colour scale for every position (<code>sink='include'</code>); mean attention "
            "received per position is in <code>maps.json</code> (<code>sinks</code>).</p>"
        )
    toks = payload["tokens"]
    rec = sk["attention_received"]
    items = ", ".join(
        f"{j} <code>{html.escape(toks[j])}</code> (receives {100 * rec[j]:.0f}% of later positions' attention)"
        for j in sk["positions"]
    )
    head = "".join(f"<th>⚓ {j} <code>{html.escape(toks[j])}</code></th>" for j in sk["positions"])
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td>"
        + "".join(
            f"<td class='num'>{'n/a' if v is None else f'{v:.4g}'}</td>"
            for v in (vals[str(j)] for j in sk["positions"])
        )
        + "</tr>"
        for m, vals in sk["at_position"].items()
    )
    return (
        f"<p>Drawn apart (⚓, hatched, own grey scale) and left out of every colour scale (<code>sink="
        f"'{html.escape(sk['mode'])}'</code>): {items}. Their values at the read position:</p>"
        f"<table class='heads'><tr><th>method</th>{head}</tr>{rows}</table>"
    )


def _heads_table(payload: dict[str, Any]) -> str:
    hc = payload["head_contributions"]
    if not hc:
        return ""
    toks = payload["tokens"]
    sinks = set(payload["sinks"]["positions"])
    total = sum(abs(v) for row in hc["contributions"] for v in row if v is not None) or 1.0
    rows = []
    for r, t in enumerate(hc["top"]):
        src = hc["by_source"][f"L{t['layer']}H{t['head']}"]
        cand = [j for j in range(len(src)) if j not in sinks] or list(range(len(src)))
        j = max(cand, key=lambda j: abs(src[j]))
        rows.append(
            f"<tr><td>{r + 1}</td><td>L{t['layer']}H{t['head']}</td><td class='num'>{t['contribution']:+.4g}</td>"
            f"<td class='num'>{100 * abs(t['contribution']) / total:.1f}%</td>"
            f"<td>{j} <code>{html.escape(toks[j])}</code> ({src[j]:+.3g})</td></tr>"
        )
    return (
        f"<p>Logit of <b>{html.escape(hc['token_label'])}</b> at position {hc['position']}: {hc['logit']:.4g}.</p>"
        "<table class='heads'><tr><th>rank</th><th>head</th><th>contribution</th><th>share of Σ|contribution|</th>"
        "<th>main source" + (" (without ⚓)" if sinks else "") + "</th></tr>" + "".join(rows) + "</table>"
    )


def _index_html(
    out: Path, payload: dict[str, Any], pngs: Sequence[str], interactive: bool, head_pages: Sequence[str] = ()
) -> str:
    p = payload["position"]
    pred = payload["prediction"]
    lines = [
        f"<p>Prompt ({len(payload['tokens'])} tokens): <code>{html.escape(' '.join(payload['tokens']))}</code></p>",
    ]
    if pred is not None:
        lines.append(f"<p>Prediction at position {p}: <b>{html.escape(pred[p])}</b></p>")
    lines.append(_sink_section(payload))
    lines.append(
        "<h2>Explore</h2><p>method <select id='method'></select> output position <select id='pos'></select></p>"
        "<div id='strip'></div><p id='rowinfo' class='note'></p>"
    )
    for name in pngs:
        lines.append(
            f"<h2>{html.escape(name[:-4].replace('_', ' '))}</h2><p class='note'>{html.escape(_CAPTIONS.get(name, ''))}</p>"
            f"<img alt='{html.escape(name)}' src='data:image/png;base64,{_png_b64(out / name)}'>"
        )
        if name == "top_heads.png":
            lines.append(_heads_table(payload))
    if head_pages:
        lines.append(
            "<h2>heads, layer by layer</h2><p class='note'>"
            + html.escape(_CAPTIONS["heads.png"])
            + " One page per layer (files under <code>heads/</code>), opened on demand.</p>"
        )
        for name in head_pages:
            layer = int(name.split("_")[-1][:-4])
            lines.append(
                f"<details><summary>layer {layer}</summary>"
                f"<img loading='lazy' alt='{html.escape(name)}' src='{html.escape(name)}'></details>"
            )
    if interactive:
        lines.append("<p><a href='interactive.html'>Interactive maps (circuitsvis)</a></p>")
    if payload["notes"]:
        lines.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in payload["notes"]) + "</ul>")
    lines.append("<p class='note'>All maps are in <code>maps.json</code>.</p>")
    data = {k: payload[k] for k in ("tokens", "maps", "position", "prediction")}
    data["sinks"] = payload["sinks"]["positions"]
    text = json.dumps(data).replace("</", "<\\/")
    body = "\n".join(lines) + f"<script type='application/json' id='data'>{text}</script>"
    return _page(f"TensorLens report: {payload['model']}", body, script=_JS)


__all__ = [
    "DEFAULT_METHODS",
    "PAGED_LAYERS",
    "SINK_MODES",
    "SINK_THRESHOLD",
    "TENSOR_MAPS",
    "ExplainReport",
    "available_methods",
    "explain",
    "resolve_methods",
    "sink_positions",
]
