"""The ``explain`` report: one prompt through TensorLens, written as PNGs, an HTML page and JSON.

:func:`explain` captures the prompt once and writes into one folder:

* ``maps.json``: the prompt, the model's prediction per position, every N×N map (tensor collapses
  Norm, In+Out and Logit of the model's own prediction, plus registered baselines), the per-layer
  and per-head maps and the tensor logit lens;
* ``methods.png`` (the maps side by side), ``relevance.png`` (the read position's row of every
  method), ``layers.png`` (each block's Norm collapse), ``heads.png`` (each head's
  ``|A_h| ‖W_V W_O‖_F``), ``logit_lens.png`` (tensor logit lens at the read position);
* ``index.html``: one self-contained page (images inlined, an interactive map explorer in plain
  JavaScript, no network access), and ``interactive.html`` through circuitsvis when installed.

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
    """

    out: Path
    files: tuple[str, ...]
    tokens: tuple[str, ...]
    maps: dict[str, Tensor]
    position: int
    prediction: str
    notes: tuple[str, ...] = field(default=())


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

    Returns:
        An :class:`ExplainReport`.

    Raises:
        ArgumentError: unknown method, position out of range.
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
    signed_note = "red: positive, blue: negative"
    save(
        plotting.plot_method_comparison(maps, tokens, title=f"{model_name}: relevance maps ({signed_note})"),
        "methods.png",
    )
    save(
        plotting.plot_method_comparison(
            maps,
            tokens,
            position=p,
            title=f"what drives position {p} ('{tokens[p]}')" + (f" → predicts '{pred_label}'" if pred_label else ""),
        ),
        "relevance.png",
    )
    layer_maps: list[Tensor] = []
    if per_layer:
        base = TensorLens.from_state(model, state)
        layer_maps = [base.block(layer).collapse("norm") for layer in range(state.n_layers)]
        save(
            plotting.plot_map_grid(
                layer_maps,
                tokens,
                titles=[f"block {layer}" for layer in range(state.n_layers)],
                title="per-block tensor, Norm collapse ‖T_l[i,:,j,:]‖_F",
                cbar_label="Frobenius norm",
            ),
            "layers.png",
        )
    head_maps: list[Tensor] = []
    head_titles: list[str] = []
    if per_head:
        base = TensorLens.from_state(model, state)
        n_heads = int(state.pattern(0).shape[0])
        for layer in range(state.n_layers):
            for h in range(n_heads):
                head_maps.append(base.head(layer, h).norm_collapse())
                head_titles.append(f"L{layer}H{h}")
        save(
            plotting.plot_map_grid(
                head_maps,
                tokens,
                titles=head_titles,
                ncols=n_heads,
                title="per-head tensor A_h ⊗ W_OVᵀ, Norm collapse |A_h[i,j]|·‖W_V W_O‖_F",
                cbar_label="Frobenius norm",
            ),
            "heads.png",
        )
    ll_json: dict[str, Any] | None = None
    if logit_lens and decoder:
        from tl_tensorlens.methods.logit_lens import tensor_logit_lens

        ll = tensor_logit_lens(model, state, positions=[p])
        vocab = {int(t): _vocab_label(model, int(t)) for t in torch.cat([ll.target.reshape(-1), ll.tl_top.reshape(-1)])}
        vlist = [vocab.get(i, f"#{i}") for i in range(max(vocab) + 1)]
        save(plotting.plot_logit_lens(ll, tokens, position=p, vocab=vlist), "logit_lens.png")
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
        "heads": {t: _finite(m) for t, m in zip(head_titles, head_maps, strict=True)},
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

    (out / "index.html").write_text(_index_html(out, payload, [f for f in files if f.endswith(".png")], interactive))
    files.append("index.html")
    if decoder:
        _add_prediction_summary(out, model, state, p, answer)
    return ExplainReport(out, tuple(files), tuple(tokens), maps, p, pred_label, tuple(notes))


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
"""

_JS = """
const R = JSON.parse(document.getElementById('data').textContent);
function rgb(v){v=Math.max(-1,Math.min(1,v));const c=Math.round(255*(1-Math.abs(v)));
  return v>=0?`rgb(255,${c},${c})`:`rgb(${c},${c},255)`;}
function show(){
  const m = document.getElementById('method').value, i = +document.getElementById('pos').value;
  const row = R.maps[m][i]; let mx = 1e-300; row.forEach(v=>{if(v!==null) mx=Math.max(mx,Math.abs(v));});
  const strip = document.getElementById('strip'); strip.innerHTML='';
  R.tokens.forEach((t,j)=>{const s=document.createElement('span'); s.className='tok'+(j===i?' sel':'');
    const v=row[j]; s.style.background = v===null?'#ddd':rgb(v/mx); s.textContent=t;
    s.title = v===null?'n/a':v.toPrecision(4); s.onclick=()=>{document.getElementById('pos').value=j; show();};
    strip.appendChild(s);});
  document.getElementById('rowinfo').textContent =
    `method ${m}, output position ${i} ('${R.tokens[i]}')` + (R.prediction?` predicts '${R.prediction[i]}'`:'') +
    ` — max |relevance| ${mx.toPrecision(3)}; click a token to read its row`;
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
    "logit_lens.png": "Tensor logit lens: per layer, which inputs drive the logit-lens prediction at the read "
    "position (rows sum, with the bias, to TransformerLens' logit-lens logit).",
}


def _index_html(out: Path, payload: dict[str, Any], pngs: Sequence[str], interactive: bool) -> str:
    p = payload["position"]
    pred = payload["prediction"]
    lines = [
        f"<p>Prompt ({len(payload['tokens'])} tokens): <code>{html.escape(' '.join(payload['tokens']))}</code></p>",
    ]
    if pred is not None:
        lines.append(f"<p>Prediction at position {p}: <b>{html.escape(pred[p])}</b></p>")
    lines.append(
        "<h2>Explore</h2><p>method <select id='method'></select> output position <select id='pos'></select></p>"
        "<div id='strip'></div><p id='rowinfo' class='note'></p>"
    )
    for name in pngs:
        lines.append(
            f"<h2>{html.escape(name[:-4].replace('_', ' '))}</h2><p class='note'>{html.escape(_CAPTIONS.get(name, ''))}</p>"
            f"<img alt='{html.escape(name)}' src='data:image/png;base64,{_png_b64(out / name)}'>"
        )
    if interactive:
        lines.append("<p><a href='interactive.html'>Interactive maps (circuitsvis)</a></p>")
    if payload["notes"]:
        lines.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in payload["notes"]) + "</ul>")
    lines.append("<p class='note'>All maps are in <code>maps.json</code>.</p>")
    data = json.dumps({k: payload[k] for k in ("tokens", "maps", "position", "prediction")}).replace("</", "<\\/")
    body = "\n".join(lines) + f"<script type='application/json' id='data'>{data}</script>"
    return _page(f"TensorLens report: {payload['model']}", body, script=_JS)


__all__ = ["DEFAULT_METHODS", "ExplainReport", "TENSOR_MAPS", "available_methods", "explain", "resolve_methods"]
