"""Perturbation study (paper Sec. 4.1) on the project's real subjects; writes a Markdown report.

Encoder: the real all-MiniLM-L6-v2 with the project's linear polarity head on [CLS], held-out
sentence-polarity test sentences, [MASK] replacement. Decoder: the project-trained induction model
on repeated-segment sequences cut at a repeat position, ``<unk>`` replacement; and the project's
WikiText-2 language model (built into its cache folder on first use) on held-out windows. All 8
baselines, the 3 tensor collapses and a random control, positive and negative perturbation,
bootstrap CIs.
ALTI (Ferrando et al. 2022) runs beside the 8 paper baselines.

Rows go to ``--work-dir`` (JSONL, resumable: rerun the same command after an interruption).
The exact Norm collapse costs d_model vector-Jacobian products per sentence (MiniLM: about 1.5 s a
sentence with its perturbation forwards, 2 threads), so ``--n-norm`` can limit it to the first
sentences; the table then says so.

The work folder defaults to ``./perturbation`` and the report to ``<work-dir>/perturbation.md``;
``scripts/run_perturbation_study.py`` (a source checkout) passes the repository's
``.cache/perturbation`` and ``docs/perturbation.md`` explicitly.

Usage:
    python -m tl_tensorlens.studies.perturbation --n-sentences 500 --n-norm 500
    tl-tensorlens perturb --out out/perturbation -- --n-sentences 500 --n-norm 500
"""

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.evaluation.perturbation import (
    ClassifierReadout,
    Example,
    NextTokenReadout,
    PerturbationConfig,
    format_table,
    paired_differences,
    per_example_scores,
    run_perturbation,
    summarize,
)
from tl_tensorlens.methods import ALL_BASELINES, GRADIENT_METHODS, RANDOMIZED_NORM, get_method
from tl_tensorlens.studies._common import fractions, nonnegative_int, positive_int, replace_block

#: Every method of the studies: the attention baselines, the tensor collapses, the gradient
#: baselines (class-specific, like In+Class) and the random control.
METHODS = [*ALL_BASELINES, "tensor_norm", "tensor_in_out", "tensor_in_class", *GRADIENT_METHODS, "random"]
#: Real LLMs: the exact Norm map costs d_model (576) VJPs per row, so the Hutchinson estimate stands in.
LLM_METHODS = [m if m != "tensor_norm" else RANDOMIZED_NORM for m in METHODS]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The study's arguments (``prog``: the command name shown in help and in the report)."""
    work_dir = Path("perturbation")
    docs = None
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--subjects",
        default="polarity,induction,wikitext",
        help="comma list: polarity (MiniLM + frozen probe), polarity_ft (fine-tuned MiniLM), induction, wikitext, "
        "smollm2 (real LLM on held-out WikiText-2)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of registry methods (default: every baseline, tensor and gradient method, random)",
    )
    p.add_argument("--n-ft", type=positive_int, default=500, help="held-out sentences for polarity_ft")
    p.add_argument("--max-len", type=positive_int, default=128, help="token limit of the encoder sentences")
    p.add_argument("--n-llm", type=positive_int, default=60, help="held-out WikiText-2 windows for smollm2")
    p.add_argument(
        "--llm-lengths", default="16,128", help="min,max window length (tokens) for smollm2, drawn uniformly"
    )
    p.add_argument(
        "--n-norm-llm", type=nonnegative_int, default=0, help="smollm2 windows that also get the exact tensor_norm"
    )
    p.add_argument("--n-sentences", type=positive_int, default=500, help="held-out polarity sentences")
    p.add_argument(
        "--n-norm",
        type=nonnegative_int,
        default=500,
        help="polarity sentences that also get the exact tensor_norm (the first N)",
    )
    p.add_argument("--n-decoder", type=positive_int, default=300, help="induction sequences")
    p.add_argument("--n-wikitext", type=positive_int, default=200, help="held-out WikiText windows")
    p.add_argument("--fractions", type=fractions, default="0,0.05,0.1,0.15,0.2,0.25,0.3")
    p.add_argument("--n-bootstrap", type=positive_int, default=1000)
    p.add_argument("--work-dir", default=str(work_dir), help="resumable JSONL rows (default: %(default)s)")
    p.add_argument(
        "--docs",
        default=docs,
        help="Markdown report, its PNGs beside it; '' to skip (default: "
        + (docs if docs is not None else "<work-dir>/perturbation.md")
        + ")",
    )
    p.add_argument(
        "--rank-by",
        choices=("value", "magnitude"),
        default="value",
        help="rank tokens by relevance (the paper) or by |relevance| (fairer to signed maps in negative perturbation)",
    )
    p.add_argument(
        "--keep-last",
        action="store_true",
        help="never mask the last token (a decoder's query position; masking it flips the next-token "
        "prediction almost always, which rewards methods that rank it first)",
    )
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p


def _run(
    model: Any,
    examples: list[Example],
    readout: Any,
    conf: PerturbationConfig,
    path: Path,
    methods: list[str],
    n_norm: int,
    progress: bool,
    notes: list[str],
) -> list[dict[str, Any]]:
    before = _line_count(path)
    rows = run_perturbation(
        model, examples, [m for m in methods if m != "tensor_norm"], readout, conf, path, progress=progress
    )
    if "tensor_norm" in methods and n_norm > 0:
        rows += run_perturbation(model, examples[:n_norm], ["tensor_norm"], readout, conf, path, progress=progress)
    # Rows are only ever appended, and only for the requested examples and methods, so what this
    # call did not append it resumed. (The file may hold rows of other examples: not counted.)
    reused = len(rows) - (_line_count(path) - before)
    if reused:
        # Say so: the report's wall time then covers only the rows this run added.
        notes.append(f"{path.name}: {reused} of {len(rows)} rows resumed from an earlier run")
        print(notes[-1], flush=True)
    return rows


def _line_count(path: Path) -> int:
    """Rows in a results JSONL file (0 when it does not exist yet)."""
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)


def _polarity_setup(
    model: Any, head: Any, sentences: Sequence[str], max_len: int, conf_kw: dict[str, Any]
) -> tuple[list[Example], PerturbationConfig, ClassifierReadout]:
    """The MiniLM polarity subjects' examples (truncated to ``max_len`` tokens), [MASK] replacement with
    [CLS]/[SEP]/[PAD] never masked, and the head's readout on [CLS]."""
    tok = model.tokenizer
    examples = [
        Example(f"test{i}", torch.tensor(tok(s, truncation=True, max_length=max_len)["input_ids"]))
        for i, s in enumerate(sentences)
    ]
    conf = PerturbationConfig(
        mask_token_id=tok.mask_token_id,
        special_token_ids=(tok.cls_token_id, tok.sep_token_id, tok.pad_token_id),
        **conf_kw,
    )
    readout = ClassifierReadout(head.W.to(torch.float32), head.b.to(torch.float32), position=0)
    return examples, conf, readout


def _polarity(args: argparse.Namespace, conf_kw: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    from tl_tensorlens.subjects import load_minilm, load_polarity_data

    model = load_minilm(backend="auto").eval()
    try:
        from tl_tensorlens.subjects import load_polarity_head

        head = load_polarity_head()
        head_note = f"shipped head (test accuracy {head.metrics.get('test_acc', head.metrics)})"
    except Exception as err:  # the head is another issue's artefact: train it if it is absent
        from tl_tensorlens.subjects import train_polarity

        print(f"polarity head unavailable ({err}); training it with train_polarity()", flush=True)
        head = train_polarity()
        head_note = f"head trained by train_polarity() in this run ({head.metrics})"
    examples, conf, readout = _polarity_setup(
        model, head, load_polarity_data().test.sentences[: args.n_sentences], 64, conf_kw
    )
    path = Path(args.work_dir) / f"polarity_{conf.key()}.jsonl"
    methods = _methods(args, METHODS, ig_baseline=conf.mask_token_id, keep=conf.special_token_ids)
    rows = _run(model, examples, readout, conf, path, methods, args.n_norm, not args.no_progress, args.notes)
    return rows, (
        f"MiniLM (all-MiniLM-L6-v2, {type(model).__name__} fp32) + {head_note}; {len(examples)} held-out "
        f"test sentences (seed-0 split), [MASK] replacement, [CLS]/[SEP] never masked; Integrated Gradients "
        f"from the [MASK] embedding ({IG_REF}, [CLS]/[SEP] kept)"
    )


#: Integrated Gradients from the study's replacement token instead of the zero embedding (the real
#: subjects): the path then runs from the input the perturbation test deletes toward, and on a
#: pre-RMSNorm decoder the zero baseline is degenerate (RMSNorm(αx) is flat in α until α·rms(x) ~ eps,
#: so 32 Gauss-Legendre nodes miss the jump: completeness off by up to 10x, measured on SmolLM2).
IG_REF = "integrated_gradients_ref"


def _methods(
    args: argparse.Namespace, default: list[str], *, ig_baseline: int | None = None, keep: Any = ()
) -> list[str]:
    methods = list(default) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if ig_baseline is not None:
        from tl_tensorlens.methods import register_method
        from tl_tensorlens.methods.gradients import make_integrated_gradients

        register_method(
            IG_REF,
            make_integrated_gradients(baseline_token=ig_baseline, keep_tokens=tuple(keep)),
            description=f"Integrated Gradients from token {ig_baseline} (the replacement token), 32 nodes",
            family="gradient",
            class_specific=True,
            overwrite=True,
        )
        if args.methods is None:
            # Only the default list swaps: an explicit --methods integrated_gradients keeps the zero baseline.
            methods = [IG_REF if m == "integrated_gradients" else m for m in methods]
    return methods


def _polarity_ft(args: argparse.Namespace, conf_kw: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    from tl_tensorlens.subjects import load_polarity_data, load_subject

    subject = load_subject("polarity_ft", backend="auto", build=True)
    model, head = subject.model.eval(), subject.head
    assert head is not None
    examples, conf, readout = _polarity_setup(
        model, head, load_polarity_data().test.sentences[: args.n_ft], args.max_len, conf_kw
    )
    path = Path(args.work_dir) / f"polarity_ft_{conf.key()}.jsonl"
    methods = _methods(args, METHODS, ig_baseline=conf.mask_token_id, keep=conf.special_token_ids)
    rows = _run(model, examples, readout, conf, path, methods, len(examples), not args.no_progress, args.notes)
    lengths = [int(e.tokens.shape[0]) for e in examples]
    return rows, (
        f"MiniLM fine-tuned end to end on sentence polarity with a linear head on [CLS] (subject polarity_ft, "
        f"held-out test accuracy {subject.metrics.get('test_acc', float('nan')):.3f}); {len(examples)} held-out test "
        f"sentences (seed-0 split, the probe's split), {min(lengths)}-{max(lengths)} tokens (limit {args.max_len}), "
        "[MASK] replacement, [CLS]/[SEP] never masked; Integrated Gradients from the [MASK] embedding "
        f"({IG_REF}, [CLS]/[SEP] kept)"
    )


def _smollm2(args: argparse.Namespace, conf_kw: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    from tl_tensorlens._paths import data_dir
    from tl_tensorlens.subjects import load_subject
    from tl_tensorlens.subjects.llm import llm_tokenizer
    from tl_tensorlens.subjects.wikitext import split_articles

    subject = load_subject("smollm2", backend="auto", dtype=torch.float32)
    model = subject.model.eval()
    tok = llm_tokenizer("smollm2")
    lo, hi = (int(v) for v in args.llm_lengths.split(","))
    text = (data_dir() / "text" / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    # The same held-out articles as the wikitext subject (every 10th article of the test split).
    articles = [" ".join(a).strip() for a in split_articles(text).heldout_articles]
    gen = torch.Generator().manual_seed(0)
    examples: list[Example] = []
    # Cut every held-out article into consecutive 128-token blocks, then take a random block (without
    # replacement) and a random window length in [lo, hi] from its start: windows never overlap.
    blocks: list[list[int]] = []
    for article in articles:
        ids = tok(article)["input_ids"]
        blocks += [ids[s : s + hi] for s in range(0, len(ids) - hi + 1, hi)]
    order = torch.randperm(len(blocks), generator=gen).tolist()
    for i in order[: args.n_llm]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        examples.append(Example(f"sm{len(examples)}", torch.tensor(blocks[i][:n])))
    if len(examples) < args.n_llm:
        raise ArgumentError(
            "--n-llm", args.n_llm, f"at most {len(blocks)} windows of {hi} tokens in the held-out articles"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    conf = PerturbationConfig(mask_token_id=int(pad), special_token_ids=(), **conf_kw)
    path = Path(args.work_dir) / f"smollm2_{conf.key()}.jsonl"
    methods = _methods(args, LLM_METHODS, ig_baseline=int(pad))
    if args.n_norm_llm and "tensor_norm" not in methods:
        methods = [*methods, "tensor_norm"]
    rows = _run(
        model, examples, NextTokenReadout(), conf, path, methods, args.n_norm_llm, not args.no_progress, args.notes
    )
    lengths = [int(e.tokens.shape[0]) for e in examples]
    return rows, (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized, TransformerBridge/HookedTransformer float32), {len(examples)} "
        f"windows of held-out WikiText-2 raw test articles, {min(lengths)}-{max(lengths)} tokens (uniform in {lo}-{hi}), "
        f"no BOS (the model's own tokenizer); the model's own next-token prediction at the last position; masked "
        f"tokens replaced by {tok.convert_ids_to_tokens(int(pad))!r} (id {pad}). The Norm map is the Hutchinson "
        f"estimate with 16 probes ({RANDOMIZED_NORM}); the exact one costs 576 VJPs per row. Integrated Gradients "
        f"runs from the replacement token's embedding ({IG_REF}; the zero baseline is degenerate under RMSNorm)"
        + ("; the last token (the query position) is never masked (--keep-last)" if args.keep_last else "")
    )


def _induction(args: argparse.Namespace, conf_kw: dict[str, Any]) -> tuple[list[dict[str, Any]], str, dict[str, float]]:
    from tl_tensorlens import capture
    from tl_tensorlens.subjects import load_subject
    from tl_tensorlens.subjects.induction import BOS_ID, induction_batch

    subject = load_subject("induction", backend="auto")
    model = subject.model.eval()
    unk = 3  # "<unk>" in the project's word tokenizers (SPECIAL_TOKENS order)
    batch = induction_batch(args.n_decoder, 31, seed=12345)
    gen = torch.Generator().manual_seed(0)
    seg = 15
    examples, src = [], []
    for i in range(args.n_decoder):
        # cut at a repeat position p: the next token is decided by induction (copy from p - seg + 1)
        p = int(torch.randint(seg + 2, 2 * seg, (1,), generator=gen))
        examples.append(Example(f"ind{i}", batch.tokens[i, : p + 1].clone()))
        src.append(int(batch.src_pos[i, p]))
    conf = PerturbationConfig(mask_token_id=unk, special_token_ids=(BOS_ID,), **conf_kw)
    path = Path(args.work_dir) / f"induction_{conf.key()}.jsonl"
    rows = _run(
        model, examples, NextTokenReadout(), conf, path, METHODS, len(examples), not args.no_progress, args.notes
    )
    # Ground truth the paper never had: does the method rank the induction source (the token to
    # copy) first among the earlier tokens (the current, last token excluded)?
    hits = {m: 0 for m in METHODS}
    with torch.no_grad():
        for ex, s in zip(examples[:100], src[:100], strict=True):
            st = capture(model, ex.tokens[None])
            n = ex.tokens.shape[0]
            pred = int(model(ex.tokens[None])[0, -1].argmax())
            for m in METHODS:
                row = get_method(m)(model, st, position=n - 1, target=pred)[n - 1, 1 : n - 1]
                hits[m] += int(int(row.argmax()) + 1 == s)
    hit_rate = {m: h / min(100, len(examples)) for m, h in hits.items()}
    desc = (
        f"project-trained induction model (2-layer GPT-2, d_model 64), {len(examples)} sequences "
        f"<bos> + 15 random tokens + their copy, cut at a random repeat position; <unk> replacement"
    )
    return rows, desc, hit_rate


def _wikitext(args: argparse.Namespace, conf_kw: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    from tl_tensorlens.subjects import WikiTextConfig, heldout_windows, load_subject
    from tl_tensorlens.subjects.wikitext import BOS_ID, UNK_ID

    # Trains the subject into its cache folder first if it is not built (a few minutes).
    subject = load_subject("wikitext", backend="auto", build=True)
    model = subject.model.eval()
    n_ctx = int(model.cfg.n_ctx)
    held = heldout_windows(model.tokenizer, WikiTextConfig(n_ctx=n_ctx))
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(held.shape[0], generator=gen)[: args.n_wikitext]
    examples = []
    for k, i in enumerate(order.tolist()):
        # a random cut, so the explained prediction sits at a random depth of the window
        p = int(torch.randint(15, n_ctx, (1,), generator=gen))
        examples.append(Example(f"wt{k}", held[i, :p].clone()))
    conf = PerturbationConfig(mask_token_id=UNK_ID, special_token_ids=(BOS_ID,), **conf_kw)
    path = Path(args.work_dir) / f"wikitext_{conf.key()}.jsonl"
    rows = _run(
        model, examples, NextTokenReadout(), conf, path, METHODS, len(examples), not args.no_progress, args.notes
    )
    m = subject.metrics
    desc = (
        f"project-trained WikiText-2 word-level LM (2-layer GPT-2, d_model {model.cfg.d_model}, held-out "
        f"perplexity {m.get('heldout_perplexity', float('nan')):.0f}, top-1 {m.get('heldout_acc', float('nan')):.3f}), "
        f"{len(examples)} windows of held-out articles cut at a random length 15-{n_ctx - 1}; the model's own "
        "next-token prediction at the last position; <unk> replacement"
    )
    return rows, desc


def _section(
    name: str,
    desc: str,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    docs_dir: Path,
    extra: dict[str, float] | None = None,
) -> str:
    summ = summarize(rows, n_resamples=args.n_bootstrap, seed=0)
    table = format_table(summ)
    if args.docs:
        from tl_tensorlens.viz.plots import plot_perturbation_curves

        fig = plot_perturbation_curves(summ)
        fig.savefig(docs_dir / f"perturbation_{name}.png", dpi=110)
    scores = per_example_scores(rows)
    lines = [f"### {name}", "", desc, "", table, "", f"![{name} curves](perturbation_{name}.png)", ""]
    present = {r["method"] for r in rows}
    refs = [m for m in ("tensor_in_class", "tensor_in_out", "tensor_norm", RANDOMIZED_NORM) if m in present]
    if refs:
        lines += [
            "Paired differences in accuracy AUC (collapse − method, over the examples both ran on; 95 % "
            "bootstrap CI; **bold**: the collapse is better, *italic*: worse, plain: not separated):",
            "",
            paired_differences(rows, refs, n_resamples=args.n_bootstrap, seed=0),
            "",
        ]
    if extra:
        lines += [
            "Ground truth (first 100 sequences): share of sequences where the method ranks the induction "
            "source token first among the earlier tokens:",
            "",
            "| method | hit rate |",
            "|---|---|",
        ]
        lines += [f"| {m} | {v:.2f} |" for m, v in extra.items()] + [""]
    n_norm = len(scores.get(("tensor_norm", "positive"), {}).get("aopc", []))
    n_all = max((len(v.get("aopc", [])) for v in scores.values()), default=0)
    if 0 < n_norm < n_all:
        lines += [f"`tensor_norm` ran on the first {n_norm} examples (its n column); the others on all.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the study; returns a process exit code.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
        prog: the command to name in the report (default ``python -m tl_tensorlens.studies.perturbation``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.notes = []
    torch.set_num_threads(args.threads)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    fractions = tuple(args.fractions)
    conf_kw = dict(fractions=fractions, rank_by=args.rank_by, keep_last=args.keep_last)
    if args.docs is None:
        args.docs = str(Path(args.work_dir) / "perturbation.md")
    docs = Path(args.docs) if args.docs else None
    docs_dir = docs.parent if docs else Path(args.work_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    start = time.perf_counter()
    for subject in [s.strip() for s in args.subjects.split(",") if s.strip()]:
        t0 = time.perf_counter()
        if subject == "polarity":
            rows, desc = _polarity(args, conf_kw)
            sections.append(_section("minilm_polarity", desc, rows, args, docs_dir))
        elif subject == "induction":
            rows, desc, hits = _induction(args, conf_kw)
            sections.append(_section("induction", desc, rows, args, docs_dir, hits))
        elif subject == "wikitext":
            rows, desc = _wikitext(args, conf_kw)
            sections.append(_section("wikitext", desc, rows, args, docs_dir))
        elif subject == "polarity_ft":
            rows, desc = _polarity_ft(args, conf_kw)
            sections.append(_section("minilm_polarity_ft", desc, rows, args, docs_dir))
        elif subject == "smollm2":
            rows, desc = _smollm2(args, conf_kw)
            sections.append(_section("smollm2_wikitext", desc, rows, args, docs_dir))
        else:
            print(f"unknown subject {subject!r}", file=sys.stderr)
            return 2
        print(f"{subject}: {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = f"{prog or 'python -m tl_tensorlens.studies.perturbation'} " + " ".join(argv)
    body = "\n".join(
        [
            f"Generated by `{cmd.strip()}` in {time.perf_counter() - start:.0f} s "
            f"(torch threads: {args.threads}); fractions {list(fractions)}; {args.n_bootstrap} bootstrap resamples, "
            "95 % percentile CIs over examples."
            + (" The time covers only new rows: " + "; ".join(args.notes) + "." if args.notes else ""),
            "",
            *sections,
        ]
    )
    print(body)
    if docs is not None:
        replace_block(docs, START, END, body, title="Perturbation tests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
