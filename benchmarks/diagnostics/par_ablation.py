"""Which step of PAR loses the answer? Swap one input of the reduction and measure.

    .venv/bin/python -m benchmarks.diagnostics.par_ablation --model .models/vqa4

PAR is relevance (step 1) followed by retrieval, clustering and routing (steps 2-4). To
tell a relevance failure from a retrieval or routing failure, this runs steps 2-4
(`par_vllm.reduction.reduce_by_relevance`, the code the plugin runs) on three relevance
scores and measures accuracy and placement on the same composite easy-VQA questions:

  prompt        PAR's own: max cosine between each visual token and the prompt's words
  prompt_centered  the same cosine after removing the shared direction on both sides: the
                image's mean visual token from each visual token, the vocabulary's mean
                word embedding from each word (a training-free variant of step 1)
  prompt_grid3  PAR's relevance averaged over each token's 3x3 neighbourhood on the patch
                grid (an object covers neighbouring patches; per-patch noise averages out)
  oracle_tile   1 on the queried tile's patches, 0 elsewhere: perfect relevance
  oracle_object 1 on the patches that show the queried shape, 0 elsewhere

If the oracles keep the full model's accuracy at a budget and the prompt relevance does
not, the failing step is relevance; if the oracles fail too, it is retrieval or routing.
`topk_oracle_tile` (keep the K highest oracle scores, no merging) separates routing
from retrieval; `topk_prompt` is the same on PAR's own relevance (the top-k baseline), so
PAR and top-k are compared on the same questions (`topk_prompt_grid3` is top-k on the
grid-averaged relevance).

Routing's merge (step 4) is varied on the prompt relevance, with PAR's kept tokens fixed:

  prompt_prune         PAR's kept tokens as they are, the others dropped (no merging)
  prompt_merge_close   merge only tokens with cosine > 0.95 to their kept token (drop the rest)
  prompt_merge_sharp   merge weights exp(relevance / 0.1) instead of exp(relevance)
  prompt_merge_anchor  the kept token weighs as much as all the tokens routed into it
  prompt_merge_protect a retrieved token takes in only its near-duplicates (PAR's duplicate
                       threshold); other tokens routed to it are dropped, centres merge as usual

and `--variant NAME:key=value,...` measures PAR with other settings (as in accuracy.py),
e.g. `--variant par-fps:centres=farthest_point`, or a baseline the plugin serves, through
the plugin's own code for it, e.g. `--variant diversity:method=diverse`. `--base
key=value,...` sets what every row but `full` and the top-k ones starts from (e.g.
`--base similarity=centred`).

Under the table every row is compared with `prompt` (PAR) at the same budget question by
question: how many answers only one of the two got right, and the exact McNemar p-value
of that split, so "PAR trails top-k by 6 answers" comes with how often chance does that;
the JSON keeps every row's answers as a string of 1 (right) and 0 (wrong), in question
order.

The language model runs in transformers (float32, greedy, the same weights vLLM serves),
fed the reduced visual tokens in place of the image placeholder, because vLLM cannot take
an externally chosen relevance. `prompt` here should match accuracy.py's PAR rows; the
table says how closely it does.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from benchmarks.common import (
    add_base_and_split,
    add_composite_arguments,
    add_variant_argument,
    discordant,
    grid_average,
    is_correct,
    mcnemar,
    model_about,
    model_words,
    object_patches,
    placement,
    settings_line,
    write_results,
)
from benchmarks.composite_vqa import TILE_PX, chat_prompt, make_composites
from par_vllm.baselines import pruned, reduce_with
from par_vllm.explain import Explainer
from par_vllm.positions import image_positions
from par_vllm.reduction import Reduction, merge, near_duplicates, reduce_by_relevance, relevance, token_space
from par_vllm.settings import ParSettings

SOURCES = ("prompt", "oracle_tile", "oracle_object", "topk_oracle_tile", "prompt_centered", "topk_prompt",
           "prompt_grid3", "topk_prompt_grid3")
DEFAULT_SOURCES = SOURCES[:4]
MERGES = ("prompt_prune", "prompt_merge_close", "prompt_merge_sharp", "prompt_merge_anchor", "prompt_merge_protect")


@torch.no_grad()
def answer(explainer: Explainer, prompt_ids: list[int], visual: torch.Tensor, max_tokens: int = 4,
           span_of: int | None = None) -> str:
    """Greedy reply of the checkpoint's language model with `visual` (K x D) in place of
    the one image placeholder in `prompt_ids`; with `span_of` = N, at the positions the
    server gives under par_positions="span" (par_vllm.positions), else consecutive."""
    model = explainer.model
    image_id = model.config.image_token_index
    at = prompt_ids.index(image_id)
    embed = model.get_input_embeddings()
    before = embed(torch.tensor(prompt_ids[:at]))
    after = embed(torch.tensor(prompt_ids[at + 1:]))
    inputs = torch.cat([before, visual.to(before.dtype), after])[None]
    kept = visual.shape[0]
    positions, delta = image_positions(inputs.shape[1], [(at, kept, span_of or kept, span_of is not None)])
    language_model, head = model.model.language_model, model.lm_head
    out = language_model(inputs_embeds=inputs, position_ids=positions[:1], use_cache=True)
    reply = []
    for step in range(max_tokens):
        token = head(out.last_hidden_state[:, -1]).argmax(-1)
        if token.item() == explainer.tokenizer.eos_token_id:
            break
        reply.append(token.item())
        position = torch.tensor([[inputs.shape[1] + step + delta]])
        out = language_model(inputs_embeds=embed(token)[None], position_ids=position,
                             past_key_values=out.past_key_values, use_cache=True)
    return explainer.tokenizer.decode(reply, skip_special_tokens=True)


def centred_relevance(visual: torch.Tensor, query: torch.Tensor, mean_word: torch.Tensor, reduce: str):
    """PAR's relevance after removing the shared direction on both sides. Visual tokens
    share one large direction (mean cosine 0.85 within an image on the v3 model), so plain
    cosine mostly measures that; the remainder is what tells tiles apart."""
    normalize = torch.nn.functional.normalize
    centred_n = normalize(visual.float() - visual.float().mean(dim=1, keepdim=True), dim=-1)
    query_n = normalize(query.float() - mean_word.float(), dim=-1)
    return relevance(centred_n, query_n, torch.ones(1, query.shape[1], dtype=torch.bool), reduce)


def remerge(mode: str, visual: torch.Tensor, visual_n: torch.Tensor, rel: torch.Tensor,
            par: Reduction, settings: ParSettings) -> Reduction:
    """PAR's kept tokens and routing, merged another way (one image)."""
    kept, assignment = par.kept_indices, par.assignment
    if mode == "prompt_prune":
        return pruned(visual, kept, par.prompt_aware)
    weight = torch.exp(rel)
    if mode in ("prompt_merge_close", "prompt_merge_protect"):
        representative = kept.gather(1, assignment)
        own = representative == torch.arange(visual.shape[1])
        if mode == "prompt_merge_close":
            to_representative = (visual_n * visual_n.gather(1, representative[..., None].expand_as(visual_n))).sum(-1)
            keep = own | (to_representative > 0.95)
        else:
            space = token_space(visual, visual_n, settings.similarity)
            duplicates = near_duplicates(space @ space.transpose(1, 2), par.retrieved,
                                         settings.duplicate_threshold)
            keep = own | duplicates | ~par.retrieved.gather(1, representative)
        # Zero weight: a token not kept adds nothing to its kept token (dropped).
        tokens = merge(visual, weight * keep, kept, assignment)
        return Reduction(tokens, kept, assignment.masked_fill(~keep, -1), par.retrieved, par.prompt_aware)
    if mode == "prompt_merge_sharp":
        weight = torch.exp(rel / 0.1)
    elif mode == "prompt_merge_anchor":
        group = torch.zeros(kept.shape, dtype=weight.dtype).scatter_add_(1, assignment, weight)
        weight = weight.scatter(1, kept, (group - weight.gather(1, kept)).clamp(min=1e-6))
    else:
        raise ValueError(f"unknown merge variant {mode!r}")
    return Reduction(merge(visual, weight, kept, assignment), kept, assignment, par.retrieved, par.prompt_aware)


def reduce(source: str, visual: torch.Tensor, query: torch.Tensor, tile, obj, num_kept: int,
           settings: ParSettings, mean_word: torch.Tensor | None = None) -> Reduction:
    if source == "prompt" and settings.method != "par":
        return reduce_with(settings.method, visual, query, torch.ones(1, query.shape[1], dtype=torch.bool),
                           num_kept, settings)
    normalize = torch.nn.functional.normalize
    visual_n = normalize(visual.float(), dim=-1)
    aware = torch.ones(1, dtype=torch.bool)
    if source == "prompt_centered":
        rel, aware = centred_relevance(visual, query, mean_word, settings.relevance)
    elif source in ("prompt", "topk_prompt", "prompt_grid3", "topk_prompt_grid3") or source in MERGES:
        query_n = normalize(query.float(), dim=-1)
        rel, aware = relevance(visual_n, query_n, torch.ones(1, query.shape[1], dtype=torch.bool),
                               settings.relevance)
        if source.endswith("_grid3"):
            rel = grid_average(rel)
    else:
        rel = torch.as_tensor(obj if source == "oracle_object" else tile, dtype=torch.float32)[None]
    if source.startswith("topk_"):
        return pruned(visual, torch.argsort(rel, dim=-1, descending=True, stable=True)[:, :num_kept], aware)
    reduction = reduce_by_relevance(visual, visual_n, rel, aware, num_kept, settings)
    if source in MERGES:
        return remerge(source, visual, visual_n, rel, reduction, settings)
    return reduction


def paired_lines(tallies: dict, reference: str = "prompt") -> list[str]:
    """Each row against `reference` at the same budget, question by question: the answers
    only one of the two got right, and the McNemar p-value of that split."""
    lines = []
    for (name, budget), tally in tallies.items():
        ours = tallies.get((reference, budget))
        if name in ("full", reference) or ours is None:
            continue
        only_ours, only_theirs = discordant([t["correct"] for t in ours], [t["correct"] for t in tally])
        lines.append(f"{name:<22}{budget:>7.1%}{only_ours:>14}{only_theirs:>14}{mcnemar(only_ours, only_theirs):>8.3f}")
    if not lines:
        return []
    header = f"{'row':<22}{'budget':>7}{'only ' + reference:>14}{'only the row':>14}{'p':>8}"
    return ["", f"Question by question against {reference} (exact McNemar test on the discordant answers):",
            header, "-" * len(header), *lines]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_composite_arguments(parser, count=200)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.111, 0.06])
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=SOURCES + MERGES)
    add_variant_argument(parser, "PAR with other settings on the prompt relevance", "par-fps:centres=farthest_point")
    add_base_and_split(parser)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    explainer = Explainer(args.model.resolve())
    tokenizer = explainer.tokenizer
    vision = explainer.config.vision_config
    mean_word = explainer.model.get_input_embeddings().weight.detach().mean(0)
    composites = make_composites(args.split, args.count, grid=vision.image_size // TILE_PX, seed=args.seed)
    variants = dict(args.variant)
    taken = set(variants) & {"full", *SOURCES, *MERGES}
    if taken:
        parser.error(f"--variant {sorted(taken)[0]!r}: that name is a relevance source; pick a new NAME")
    configs = [("full", None, 1.0)] + [(s, s, b) for b in args.budgets for s in [*args.sources, *variants]]
    tallies = {(name, budget): [] for name, _, budget in configs}
    for c in tqdm(composites, desc="ablation"):
        visual = explainer.visual_tokens(c.image())
        queries = {drop: explainer.query(c.question, drop) for drop in (True, False)}
        prompt_ids = tokenizer.encode(chat_prompt(tokenizer, c.question), add_special_tokens=False)
        side = int(visual.shape[1] ** 0.5)
        tile, obj = c.patch_mask(side), object_patches(c, vision.patch_size)
        for name, source, budget in configs:
            span_of = None
            if source is None:
                tokens, place = visual[0], {"recall": 1.0, "object_recall": 1.0, "on_target": float(tile.mean())}
            else:
                # A --variant is PAR's prompt relevance with its own settings.
                settings = ParSettings.from_keys({**args.base, **variants.get(source, {}), "par_keep_ratio": budget})
                relevance_source = "prompt" if source in variants else source
                reduction = reduce(relevance_source, visual, queries[settings.drop_question_type_words], tile, obj,
                                   settings.num_kept(visual.shape[1]), settings, mean_word)
                tokens, place = reduction.tokens[0], placement(reduction, tile, obj)
                span_of = visual.shape[1] if settings.positions == "span" else None
            ok = is_correct(answer(explainer, prompt_ids, tokens, span_of=span_of), c.answer)
            tallies[(name, budget)].append({"correct": float(ok), **place})

    full = sum(t["correct"] for t in tallies[("full", 1.0)]) / len(composites)
    rows = []
    for (name, budget), tally in tallies.items():
        mean = {k: sum(t[k] for t in tally) / len(tally) for k in tally[0]}
        rows.append({"relevance": name, "budget": budget, "accuracy": mean["correct"],
                     "pct_of_full": 100 * mean["correct"] / full if full else float("nan"),
                     "recall": mean["recall"], "object_recall": mean["object_recall"],
                     "on_target": mean["on_target"]})
    width = max(18, *(len(r["relevance"]) + 2 for r in rows))
    header = f"{'relevance':<{width}}{'budget':>7}{'accuracy':>9}{'% full':>8}{'recall':>8}{'obj rec':>8}{'on tile':>8}"
    lines = [f"PAR ablation (transformers, greedy): {len(composites)} composite easy-VQA {args.split}-split questions; "
             f"model: {model_words(model_about(args.model), args.model)}", settings_line(args.base), "",
             header, "-" * len(header)]
    lines += [f"{r['relevance']:<{width}}{r['budget']:>7.1%}{r['accuracy']:>9.3f}{r['pct_of_full']:>7.1f}%"
              f"{r['recall']:>8.3f}{r['object_recall']:>8.3f}{r['on_target']:>8.3f}" for r in rows]
    lines += paired_lines(tallies)
    text = "\n".join(lines) + "\n"
    print(text)
    stem = args.out / f"par-ablation-{args.name}"
    write_results(stem, text, {"model": str(args.model), "split": args.split, "count": len(composites),
                               "base": args.base, "seed": args.seed, "rows": rows,
                               # One character per question, in order: 1 right, 0 wrong.
                               "correct": {f"{name}@{budget}": "".join(str(int(t["correct"])) for t in tally)
                                           for (name, budget), tally in tallies.items()}})
    print(f"wrote {stem}.txt/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
