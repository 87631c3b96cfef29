"""Can an image tell PAR when to trust its prompt relevance? Two signals, measured alone.

    .venv/bin/python -m benchmarks.diagnostics.retrieval_focus --model .models/vqa4 --split train --name vqa4-train

On a model whose relevance finds the asked tile (the Qwen2.5-VL of docs/accuracy.md),
relevance top-k is ahead of PAR at the smallest budgets: its tokens lie on the tile, PAR
spends most of its budget on prompt-agnostic cluster centres. On a model whose relevance
often misses the tile (the LLaVA), those centres are what keeps PAR ahead. A rule that
gave the budget to the most relevant tokens only where an image shows its relevance can
be trusted would serve both, if some training-free signal told the two cases apart. This
script measures two, on the tokens PAR's retrieval takes at its cap (the m =
floor(retrieval_share x K) most relevant):

  coherence    their mean pairwise similarity in PAR's token space (`similarity`): an
               object's patches are near-duplicates of each other; fires above
               `duplicate_threshold`
  compactness  their RMS distance from their centroid on the patch grid over that of a
               disc of m cells, sqrt(m / 2 pi) (1: as compact as m cells can be); fires
               below `--compactness`

For each budget and signal: how often it fires, and the share of the K - 1 most relevant
tokens (what such a rule would retrieve, leaving one cluster centre) that lie on the queried
tile where it fires and where it does not; beside them the share of PAR's own retrieved
tokens on the tile. A signal worth building on fires often and, where it fires, finds the
tile on both models. Only the vision side and the embedding table run, so it is quick.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.accuracy import composite_geometry
from benchmarks.common import add_composite_arguments, add_split, model_about, model_words, write_results
from benchmarks.composite_vqa import make_composites
from par_vllm.explain import Explainer
from par_vllm.reduction import relevance, retrieve, unit_rows
from par_vllm.settings import ParSettings

SIGNALS = ("coherence", "compactness")


def signals(visual: torch.Tensor, rel: torch.Tensor, grid: tuple[int, int], m: int, settings: ParSettings) -> dict:
    """Both signals for one image (visual 1 x N x D, rel N) over its m most relevant tokens,
    `grid` the tokens' (rows, columns) in raster order."""
    top = torch.argsort(rel, descending=True, stable=True)[:m]
    mean = visual[0].float().mean(dim=0) if settings.similarity == "centred" else None
    space = unit_rows(visual[0, top], mean)
    pairwise = space @ space.T
    coherence = float((pairwise.sum() - pairwise.diagonal().sum()) / (m * (m - 1)))
    rows, cols = (top // grid[1]).float(), (top % grid[1]).float()
    spread = ((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2).mean().sqrt()
    return {"coherence": coherence, "compactness": float(spread) / math.sqrt(m / (2 * math.pi))}


def fires(signal: str, value: float, settings: ParSettings, compactness: float) -> bool:
    return value > settings.duplicate_threshold if signal == "coherence" else value < compactness


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_composite_arguments(parser, count=200)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.111, 0.06])
    parser.add_argument("--compactness", type=float, default=1.55,
                        help="compactness fires below this (1 is a disc of m cells)")
    add_split(parser)
    args = parser.parse_args(argv)

    explainer = Explainer(args.model.resolve())
    tiles_per_side, _ = composite_geometry(args.model)
    composites = make_composites(args.split, args.count, grid=tiles_per_side, seed=args.seed)
    tally = {(budget, signal): {"fired": [], "quiet": []} for budget in args.budgets for signal in SIGNALS}
    retrieved_on_tile = {budget: [] for budget in args.budgets}
    for c in tqdm(composites, desc="retrieval focus"):
        visual, grids = explainer.features(c.image())
        grid = grids[0]
        tile = torch.from_numpy(c.patch_mask(grid[0]))
        settings = ParSettings()
        query = explainer.query(c.question, settings.drop_question_type_words)
        rel, _ = relevance(F.normalize(visual.float(), dim=-1), F.normalize(query.float(), dim=-1),
                           torch.ones(1, query.shape[1], dtype=torch.bool), settings.relevance)
        order = torch.argsort(rel[0], descending=True, stable=True)
        for budget in args.budgets:
            settings = ParSettings(keep_ratio=budget)
            num_kept = settings.num_kept(visual.shape[1])
            m = max(2, int(settings.retrieval_share * num_kept))
            on_tile = float(tile[order[:num_kept - 1]].float().mean())
            for signal, value in signals(visual, rel[0], grid, m, settings).items():
                side = "fired" if fires(signal, value, settings, args.compactness) else "quiet"
                tally[(budget, signal)][side].append(on_tile)
            retrieved = retrieve(rel, num_kept, settings.outlier_factor, settings.retrieval_share,
                                 leave=int(settings.routing == "separate"), min_retrieved=settings.min_retrieved)[0]
            retrieved_on_tile[budget].append(float(tile[retrieved].float().mean()))

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    rows = []
    for (budget, signal), sides in tally.items():
        rows.append({"budget": budget, "signal": signal, "fires": len(sides["fired"]) / len(composites),
                     "on_tile_fired": mean(sides["fired"]), "on_tile_quiet": mean(sides["quiet"]),
                     "par_retrieved_on_tile": mean(retrieved_on_tile[budget])})
    header = (f"{'budget':>7}{'signal':>13}{'fires':>7}{'K-1 on tile, fired':>20}{'quiet':>7}"
              f"{'PAR retrieved on tile':>23}")
    model = model_words(model_about(args.model), args.model)
    lines = [f"retrieval focus: {len(composites)} composite easy-VQA {args.split}-split questions "
             f"(chance on tile {1 / tiles_per_side ** 2:.3f}); model: {model} ({args.model.name})",
             f"coherence fires above duplicate_threshold {ParSettings().duplicate_threshold}, compactness below "
             f"{args.compactness}", "", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['budget']:>7.1%}{r['signal']:>13}{r['fires']:>7.2f}{r['on_tile_fired']:>20.3f}"
                     f"{r['on_tile_quiet']:>7.3f}{r['par_retrieved_on_tile']:>23.3f}")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = args.out / f"retrieval-focus-{args.name}"
    write_results(stem, text, {"model": str(args.model), "split": args.split, "count": len(composites),
                               "seed": args.seed, "compactness": args.compactness, "rows": rows})
    print(f"wrote {stem}.txt/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
