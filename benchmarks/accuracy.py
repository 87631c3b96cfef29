"""Accuracy of PAR and the baselines at the same budget, served by the real vLLM engine.

    .venv/bin/python -m benchmarks.accuracy --model .models/vqa4

The model answers composite easy-VQA questions (composite_vqa.py) from the test split
(`--split train` for choosing settings without looking at the test questions).
Every method runs inside the plugin (`par_method` per request) at every budget, so the
language model, the prompt and the image are the same and only the kept tokens differ.

Per method and budget: accuracy, accuracy as % of the full-token model, prefill tokens
per request (vLLM's own prompt token count), and where each method puts its tokens:
  recall        share of the queried tile's patches whose information stays on that tile:
                kept, or merged into a kept token that lies on the tile (a patch merged into
                a token elsewhere is averaged into another tile's content, so it counts as lost)
  object_recall the same over the patches that show the queried shape
  on_target     share of the kept tokens that lie on the queried tile
The placement columns come from the same reduction code run on the checkpoint's own
features in transformers (par_vllm.explain), since vLLM does not return which tokens it kept.

Writes accuracy-<name>.{txt,json,png} and accuracy-<name>-explain-<i>.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

from benchmarks.common import (
    LABELS,
    add_composite_arguments,
    add_split,
    add_variant_argument,
    answer_each,
    correct_strings,
    model_about,
    model_words,
    object_patches,
    placement,
    right_answers,
    settings_arg,
    settings_line,
    write_results,
)
from benchmarks.composite_vqa import QWEN_PLACEHOLDER, TILE_PX, chat_prompt, make_composites
from par_vllm import PLACES_ROWS, WORKER_CLS, par_architecture
from par_vllm.server import CPU_ENV, par_overrides
from par_vllm.settings import ParSettings

METHODS = ("par", "pool", "random", "topk", "diverse")
BUDGETS = (0.5, 0.25, 0.111, 0.06)


def run_vllm(model: Path, composites, configs, max_num_seqs: int):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model)
    architecture = par_architecture(json.loads((model / "config.json").read_text())["architectures"])
    llm = LLM(str(model), hf_overrides=par_overrides(architecture=architecture), enforce_eager=True,
              dtype="float32", max_model_len=1024, max_num_seqs=max_num_seqs, limit_mm_per_prompt={"image": 1},
              seed=0, worker_cls=WORKER_CLS if architecture in PLACES_ROWS else "auto")
    params = SamplingParams(max_tokens=4, temperature=0.0)
    images = [c.image() for c in composites]
    placeholder = QWEN_PLACEHOLDER if architecture in PLACES_ROWS else None
    prompts = [chat_prompt(tokenizer, c.question, placeholder) for c in composites]
    return answer_each(llm, params, prompts, "image", images, configs)


def run_placement(model: Path, composites, configs, patch_px: int):
    import torch
    from tqdm import tqdm

    from par_vllm.dispatch import reduce_tokens
    from par_vllm.explain import Explainer

    explainer = Explainer(model)
    rows = {name: [] for name, _ in configs}
    for c in tqdm(composites, desc="placement"):
        visual = explainer.visual_tokens(c.image())
        query = explainer.query(c.question)
        mask = torch.ones(1, query.shape[1], dtype=torch.bool)
        side = int(visual.shape[1] ** 0.5)
        tile = c.patch_mask(side)
        obj = object_patches(c, patch_px)
        for name, kwargs in configs:
            settings = ParSettings.from_keys(kwargs)
            if settings.reduces_nothing or settings.num_kept(visual.shape[1]) >= visual.shape[1]:
                rows[name].append({"recall": 1.0, "object_recall": 1.0, "on_target": float(tile.mean())})
                continue
            reduction = reduce_tokens(visual, query, mask, settings.num_kept(visual.shape[1]), settings)
            rows[name].append(placement(reduction, tile, obj))
    return explainer, rows


def composite_geometry(model: Path) -> tuple[int, int]:
    """(tiles per side, composite pixels per visual token) of a model train_vqa saved: a
    LLaVA's from its vision config, a Qwen-VL's (which resizes every composite to a fixed
    token grid) from its training arguments."""
    about = model_about(model)
    if about.get("family") == "qwen2_5_vl":
        return about["training"]["grid"], about["training"]["patch"]
    vision = json.loads((model / "config.json").read_text())["vision_config"]
    return vision["image_size"] // TILE_PX, vision["patch_size"]


def configs_for(methods, budgets, variants=(), base=None):
    """(name, mm_processor_kwargs) per row; `base` (par_ keys) under every reduced row."""
    base = base or {}
    configs = [("full", {"par_enabled": False})]
    for budget in budgets:
        for method in methods:
            configs.append((f"{method}@{budget:g}", {**base, "par_method": method, "par_keep_ratio": budget}))
        for name, keys in variants:
            configs.append((f"{name}@{budget:g}", {**base, "par_method": "par", **keys, "par_keep_ratio": budget}))
    return configs


def summarize(composites, configs, answers, right, placements, visual_tokens):
    rows = []
    full_accuracy = None
    for name, kwargs in configs:
        correct = right[name]
        accuracy = sum(correct) / len(correct)
        if name == "full":
            full_accuracy = accuracy
        method, _, budget = name.partition("@")
        place = placements[name]
        mean = (lambda key: sum(p[key] for p in place) / len(place))  # noqa: E731
        settings = ParSettings.from_keys(kwargs)
        rows.append({
            "method": method, "budget": float(budget) if budget else 1.0,
            "visual_tokens": visual_tokens if settings.reduces_nothing else settings.num_kept(visual_tokens),
            "accuracy": accuracy,
            "pct_of_full": 100 * accuracy / full_accuracy if full_accuracy else float("nan"),
            "recall": mean("recall"), "object_recall": mean("object_recall"), "on_target": mean("on_target"),
            "prefill_tokens": sum(answers[name]["prefill_tokens"]) / len(composites),
            "color_accuracy": _share(correct, composites, "color"),
            "shape_accuracy": _share(correct, composites, "shape"),
            "vllm_seconds": round(answers[name]["seconds"], 1),
        })
    return rows


def _share(correct, composites, asks):
    picked = [ok for ok, c in zip(correct, composites) if c.asks == asks]
    return sum(picked) / len(picked) if picked else float("nan")


def table(rows) -> str:
    header = (f"{'method':<28}{'budget':>7}{'tokens':>7}{'accuracy':>9}{'% full':>8}{'color':>7}"
              f"{'shape':>7}{'recall':>8}{'obj rec':>8}{'on tile':>8}{'prefill':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{LABELS.get(r['method'], r['method']):<28}{r['budget']:>7.1%}{r['visual_tokens']:>7}{r['accuracy']:>9.3f}"
            f"{r['pct_of_full']:>7.1f}%{r['color_accuracy']:>7.3f}{r['shape_accuracy']:>7.3f}"
            f"{r['recall']:>8.3f}{r['object_recall']:>8.3f}{r['on_target']:>8.3f}{r['prefill_tokens']:>8.1f}")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["method"] == "full")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        points = sorted((r["visual_tokens"], r["accuracy"]) for r in rows if r["method"] == method)
        if points:
            points.append((full["visual_tokens"], full["accuracy"]))
            ax.plot(*zip(*points), marker="o", label=LABELS.get(method, method),
                    linestyle="-" if method in METHODS else "--")
    ax.axhline(full["accuracy"], color="grey", linestyle=":", label="no reduction")
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens kept per image (log)")
    ax.set_ylabel("accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explain_panels(explainer, composite, budget: float, methods, path: Path) -> None:
    """The same composite under every method, side by side."""
    import torch
    from PIL import Image, ImageDraw

    from par_vllm.dispatch import reduce_tokens
    from par_vllm.explain import render

    image = composite.image()
    visual = explainer.visual_tokens(image)
    query = explainer.query(composite.question)
    mask = torch.ones(1, query.shape[1], dtype=torch.bool)
    size, band = 384, 28
    canvas = Image.new("RGB", (size * len(methods), size + band * 2), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), f"Q: {composite.question}   A: {composite.answer}   budget {budget:.1%}", fill="black")
    for i, method in enumerate(methods):
        settings = ParSettings(method=method, keep_ratio=budget)
        reduction = reduce_tokens(visual, query, mask, settings.num_kept(visual.shape[1]), settings)
        canvas.paste(render(image, reduction, size=size), (i * size, band))
        draw.text((i * size + 6, size + band + 6), LABELS[method], fill="black")
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_composite_arguments(parser, count=400)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    add_variant_argument(parser, "a PAR variant measured beside the methods", "par-fps:centres=farthest_point")
    parser.add_argument("--base", default={}, type=settings_arg,
                        help="key=value,... settings under every reduced row, methods and variants "
                             "alike, e.g. positions=consecutive")
    add_split(parser)
    parser.add_argument("--explain", type=int, default=3, help="composites to render")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args(argv)
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)

    grid, patch_px = composite_geometry(args.model)
    visual_tokens = (grid * TILE_PX // patch_px) ** 2
    composites = make_composites(args.split, args.count, grid=grid, seed=args.seed)
    configs = configs_for(args.methods, args.budgets, args.variant, args.base)

    # Hugging Face reads a relative path as a hub id, so the engines get an absolute one.
    answers = run_vllm(args.model.resolve(), composites, configs, args.max_num_seqs)
    explainer, placements = run_placement(args.model.resolve(), composites, configs, patch_px)
    right = right_answers(answers, composites)
    rows = summarize(composites, configs, answers, right, placements, visual_tokens)

    about = model_about(args.model)
    title = (f"composite easy-VQA ({grid}x{grid} tiles, {visual_tokens} visual tokens), "
             f"{len(composites)} {args.split} questions; model: {model_words(about, args.model)}")
    text = (f"{title}\nvision: {about.get('vision_tower_and_projector', 'see par_model.json')}\n"
            + (f"{settings_line(args.base)} (every reduced row)\n" if args.base else "") + f"\n{table(rows)}\n")
    print(text)
    stem = args.out / f"accuracy-{args.name}"
    write_results(stem, text, {
        "model": str(args.model), "about": about, "count": len(composites), "seed": args.seed, "base": args.base,
        "grid": grid, "visual_tokens": visual_tokens, "rows": rows,
        "split": args.split, "correct": correct_strings(right),
    })
    plot(rows, stem.with_suffix(".png"), title)
    headline = min(args.budgets, key=lambda b: abs(b - 0.111))
    for i, composite in enumerate(composites[:args.explain]):
        explain_panels(explainer, composite, headline, args.methods, Path(f"{stem}-explain-{i}.png"))
    print(f"wrote {stem}.txt/.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
