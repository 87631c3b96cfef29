"""Where a par_ablation.py result file's answers are lost: per question kind, and on the
questions where PAR's retrieval finds no outlier.

    R=benchmarks/results
    .venv/bin/python -m benchmarks.diagnostics.breakdown $R/par-ablation-vqa-v4-span-400.json \
        $R/par-ablation-vqa-v4-span-seed1.json $R/par-ablation-vqa-v4-span-seed2.json \
        --out $R/breakdown-vqa-v4-span.txt

The file keeps every row's answers question by question; this rebuilds the same composites
(split, seed, count) and runs only the vision side of the file's model (no language
model), so it is quick. Per row and budget it prints the right answers on colour and on
shape questions, and on the questions where no visual token's relevance to the prompt
is an outlier (above Q3 + outlier_factor x IQR, at the file's `--base` settings) against
the rest. With no outlier, PAR's retrieval (step 2) is empty unless `par_min_retrieved`
asks for a minimum, and every kept token is a prompt-agnostic cluster centre.
Several files add up (they must come from the same model).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.composite_vqa import TILE_PX, make_composites
from par_vllm.explain import Explainer
from par_vllm.reduction import relevance, retrieve
from par_vllm.settings import ParSettings


def has_outlier(explainer: Explainer, composite, settings: ParSettings) -> bool:
    """True when some visual token's prompt relevance is an outlier, the rule of PAR's
    step 2 before its cap (which depends on the budget) and its minimum."""
    normalize = torch.nn.functional.normalize
    visual = explainer.visual_tokens(composite.image())
    query = explainer.query(composite.question, settings.drop_question_type_words)
    rel, _ = relevance(normalize(visual.float(), dim=-1), normalize(query.float(), dim=-1),
                       torch.ones(1, query.shape[1], dtype=torch.bool), settings.relevance)
    return bool(retrieve(rel, visual.shape[1], settings.outlier_factor, 1.0).any())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="par_ablation.py JSON results")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)

    totals: dict[str, Counter] = {}
    groups_n: Counter = Counter()
    no_outlier_words: Counter = Counter()
    model = explainer = None
    for path in args.files:
        data = json.loads(path.read_text())
        if "correct" not in data:
            parser.error(f"{path} has no per-question answers (written before par_ablation.py kept them)")
        if model is None:
            model = data["model"]
            explainer = Explainer(Path(model).resolve())
        elif data["model"] != model:
            parser.error(f"{path}: another model ({data['model']}) than the files before it")
        settings = ParSettings.from_keys(data["base"])
        grid = explainer.config.vision_config.image_size // TILE_PX
        composites = make_composites(data["split"], data["count"], grid=grid, seed=data["seed"])
        groups = []
        for c in tqdm(composites, desc=path.name):
            found = "outlier" if has_outlier(explainer, c, settings) else "no outlier"
            groups.append((c.asks, found))
            groups_n.update(groups[-1])
            if found == "no outlier":
                # The word the prompt names its tile by (the question-type word is dropped).
                no_outlier_words[c.tiles[c.target].shape if c.asks == "color" else c.tiles[c.target].color] += 1
        for row, answers in data["correct"].items():
            tally = totals.setdefault(row, Counter())
            for pair, right in zip(groups, answers):
                tally.update({key: int(right) for key in (*pair, "all")})

    keys = ["color", "shape", "outlier", "no outlier"]
    header = f"{'row':<24}{'all':>7}" + "".join(f"{f'{k} ({groups_n.get(k, 0)})':>18}" for k in keys)
    count = sum(groups_n.get(k, 0) for k in ("color", "shape"))
    lines = [f"Right answers by question kind and by whether any visual token's prompt relevance is "
             f"an outlier; {count} questions from {len(args.files)} file(s); model {model}", "",
             header, "-" * len(header)]
    for row, tally in totals.items():
        lines.append(f"{row:<24}{tally['all']:>7}" + "".join(f"{tally.get(k, 0):>18}" for k in keys))
    named = ", ".join(f"{word} {n}" for word, n in no_outlier_words.most_common())
    lines += ["", f"Questions with no outlier, by the word that names the queried tile: {named or 'none'}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
