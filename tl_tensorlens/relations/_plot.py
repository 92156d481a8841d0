"""Bar plot of a relation study (matplotlib imported only when called; returns the figure)."""

from collections.abc import Iterable, Sequence
from typing import Any

from tl_tensorlens.relations._study import ok_methods, summarize_results

__all__ = ["plot_relation_results"]


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
