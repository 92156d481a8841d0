"""TL 4.3's Jacobian lens vs the frozen per-prompt transport of TensorLens, on the same prompts.

Fits ``JacobianLens`` on the prompts (TL's estimator: averaged true Jacobians), then per layer
compares its matrices with the frozen operator's J-lens-shaped summary and reads every layer at each
prompt's last position (methods/jlens.py). One LLM process; float32.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/compare_jlens.py --subject smollm2 --layers 0,7,14,21,28
"""

import argparse
import time
import warnings

import torch

from tl_tensorlens.methods.jlens import compare_jlens, format_jlens_table
from tl_tensorlens.subjects import load_subject

PROMPTS = [
    "The Eiffel Tower is in the city of Paris, and the Colosseum is in the city of",
    "Water freezes at zero degrees and boils at one hundred degrees on the Celsius",
    "She opened the door, looked outside at the rain, and decided to take her",
    "In 1969, Neil Armstrong became the first person to walk on the surface of the",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subject", default="smollm2")
    p.add_argument("--layers", default="0,7,14,21,28", help="source layers (block outputs)")
    p.add_argument("--skip-first-positions", type=int, default=4)
    p.add_argument("--n-prompts", type=int, default=len(PROMPTS))
    p.add_argument("--with-true", action="store_true", help="also compute our true-Jacobian estimator")
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

    model = load_subject(args.subject, backend="bridge", dtype=torch.float32).model
    prompts = PROMPTS[: args.n_prompts]
    layers = [int(v) for v in args.layers.split(",")]
    lengths = [int(model.to_tokens(q).shape[-1]) for q in prompts]
    print(
        f"{args.subject} float32; {len(prompts)} prompts of {lengths} tokens; skip_first_positions={args.skip_first_positions}"
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = JacobianLens.fit(
            model,
            prompts,
            corpus="compare_jlens",
            source_layers=layers,
            skip_first_positions=args.skip_first_positions,
            show_progress=False,
        )
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = compare_jlens(
        model, prompts, fitted, layers=layers, skip_first_positions=args.skip_first_positions, with_true=args.with_true
    )
    t_cmp = time.perf_counter() - t0
    print(format_jlens_table(rows))
    print(f"time: JacobianLens.fit {t_fit:.1f} s; compare_jlens (frozen transport matrices + readouts) {t_cmp:.1f} s")


if __name__ == "__main__":
    main()
