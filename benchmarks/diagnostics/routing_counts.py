"""Where PAR's routing sends the image: how many tokens each kept token takes in.

    .venv/bin/python -m benchmarks.diagnostics.routing_counts --model .models/vqa4 --name vqa-v4

On composite easy-VQA questions (`--split`), per budget and PAR variant (`--variant`, as
in accuracy.py, on top of `--base`), the mean per image of: tokens retrieved (step 2),
tokens merged into a retrieved token, of those the near-duplicates (similarity to a
retrieved token above `duplicate_threshold`), and tokens merged into a cluster centre.
Only the vision side runs (no language model), so it is quick. It explains the ablation:
a retrieved token that takes in much of the image stops reading as the thing the prompt
asked about.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from benchmarks.common import (
    add_base_and_split,
    add_composite_arguments,
    add_variant_argument,
    model_about,
    model_words,
    settings_line,
    write_results,
)
from benchmarks.composite_vqa import TILE_PX, make_composites
from par_vllm.explain import Explainer
from par_vllm.reduction import near_duplicates, par_reduce, token_space
from par_vllm.settings import ParSettings


def counts(visual: torch.Tensor, query: torch.Tensor, settings: ParSettings) -> dict:
    """One image (1 x N x D) under one setting."""
    num_kept = settings.num_kept(visual.shape[1])
    reduction = par_reduce(visual, query, torch.ones(1, query.shape[1], dtype=torch.bool), num_kept, settings)
    retrieved = reduction.retrieved[0]
    representative = reduction.kept_indices[0][reduction.assignment[0].clamp(min=0)]
    routed = (reduction.assignment[0] >= 0) & (representative != torch.arange(visual.shape[1]))
    to_retrieved = retrieved[representative]
    into_retrieved = routed & to_retrieved
    space = token_space(visual, torch.nn.functional.normalize(visual.float(), dim=-1), settings.similarity)
    duplicates = near_duplicates(space @ space.transpose(1, 2), reduction.retrieved,
                                 settings.duplicate_threshold)[0]
    return {"retrieved": float(retrieved.sum()), "into_retrieved": float(into_retrieved.sum()),
            "into_retrieved_duplicates": float((into_retrieved & duplicates).sum()),
            "into_centres": float((routed & ~to_retrieved).sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_composite_arguments(parser, count=400)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.111, 0.06])
    add_variant_argument(parser, "PAR with other settings", "par-fps:centres=farthest_point")
    add_base_and_split(parser)
    args = parser.parse_args(argv)

    explainer = Explainer(args.model.resolve())
    composites = make_composites(args.split, args.count, grid=explainer.config.vision_config.image_size // TILE_PX,
                                 seed=args.seed)
    variants = [("par", {})] + list(args.variant)
    configs = [(name, budget, ParSettings.from_keys({**args.base, **keys, "par_keep_ratio": budget}))
               for budget in args.budgets for name, keys in variants]
    tallies: dict[tuple, list[dict]] = {(name, budget): [] for name, budget, _ in configs}
    for c in tqdm(composites, desc="routing counts"):
        visual = explainer.visual_tokens(c.image())
        queries = {drop: explainer.query(c.question, drop) for drop in (True, False)}
        for name, budget, settings in configs:
            tallies[(name, budget)].append(counts(visual, queries[settings.drop_question_type_words], settings))

    rows = []
    for (name, budget), tally in tallies.items():
        rows.append({"variant": name, "budget": budget,
                     **{k: sum(t[k] for t in tally) / len(tally) for k in tally[0]}})
    header = f"{'variant':<18}{'budget':>7}{'retrieved':>10}{'into retrieved':>15}{'(near-dup)':>11}{'into centres':>13}"
    vision = explainer.config.vision_config
    lines = [f"PAR routing, mean tokens per image: {len(composites)} composite easy-VQA {args.split}-split questions, "
             f"{(vision.image_size // vision.patch_size) ** 2} visual tokens; "
             f"model: {model_words(model_about(args.model), args.model)}",
             settings_line(args.base), "",
             header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['variant']:<18}{r['budget']:>7.1%}{r['retrieved']:>10.1f}{r['into_retrieved']:>15.1f}"
                     f"{r['into_retrieved_duplicates']:>11.1f}{r['into_centres']:>13.1f}")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = args.out / f"routing-counts-{args.name}"
    write_results(stem, text, {"model": str(args.model), "split": args.split, "count": len(composites),
                               "base": args.base, "rows": rows})
    print(f"wrote {stem}.txt/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
