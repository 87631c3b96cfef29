"""LLaVA-NeXT (AnyRes) with PAR, on a tiny random-weight LLaVA-NeXT built here: one budget
over the base view and the tiles, the row separators never scored or merged, and with
nothing removed exactly vLLM's own LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch

from par_vllm.demo import demo_image
from par_vllm.models.base import Layout
from par_vllm.server import par_overrides

import offline_engine
from offline_engine import close, same, text_tokens

NEXT = "ParLlavaNextForConditionalGeneration"
PROMPT = "USER: <image>\nWhat color is the triangle?\nASSISTANT:"
OTHER = "USER: <image>\nWhere is the blue circle?\nASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nWhich shape is larger?\nASSISTANT:"
# A conversation about one image: each later turn appends the reply and a new question.
CONVERSATION = [PROMPT, PROMPT + " red</s>USER: Where is the blue circle?\nASSISTANT:"]
CONVERSATION.append(CONVERSATION[1] + " left</s>USER: What shape is green?\nASSISTANT:")
# (width, height): (N, grid rows, row width) as vLLM counts them: the 576-token base view,
# then each unpadded grid row of visual tokens followed by one image_newline.
LAYOUTS = {(672, 672): (2928, 48, 48), (640, 480): (2340, 36, 48), (336, 336): (1176, 24, 24)}
# At par_keep_ratio 0.111: K = ceil(visual x 0.111) visual tokens, then one separator.
RESERVED = {(672, 672): 320 + 1, (640, 480): 256 + 1, (336, 336): 128 + 1}


def image(size):
    return demo_image().resize(size)


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from par_vllm.demo_model import make_demo_next_model

    return make_demo_next_model(tmp_path_factory.mktemp("models") / "next")


@pytest.mark.parametrize("size", LAYOUTS)
def test_separators_sit_where_the_model_puts_image_newline(next_model, size):
    """The layout's separator rows are exactly the rows transformers' LLaVA-NeXT fills with
    its learned image_newline, for a square, a landscape and a single-tile image."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(next_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(next_model)
    inputs = processor(images=image(size), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output[0]
    layout = Layout(*LAYOUTS[size])
    assert features.shape[0] == layout.full
    newline = (features == model.model.image_newline).all(dim=-1)
    assert torch.equal(~layout.visual_mask(), newline)
    assert layout.num_visual == layout.full - layout.rows


@pytest.mark.parametrize("method", ["par", "pool", "topk"])
def test_the_reduced_rows_are_k_visual_tokens_then_one_separator(next_model, method):
    """What the model hands vLLM for two images of different shapes, computed by the plugin's
    own function on the rows transformers' LLaVA-NeXT emits: K rows built from visual tokens
    only (none is the separator), then exactly one separator."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaNextForConditionalGeneration

    from par_vllm.models.base import reduce_images
    from par_vllm.settings import ParSettings

    model = LlavaNextForConditionalGeneration.from_pretrained(next_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(next_model)
    tokenizer = AutoTokenizer.from_pretrained(next_model)
    sizes = [(672, 672), (640, 480)]
    features = []
    with torch.no_grad():
        for size in sizes:
            inputs = processor(images=image(size), text=PROMPT, return_tensors="pt")
            features.append(model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output[0])
        settings = [ParSettings(method=method)] * 2
        query = [torch.tensor(tokenizer.encode("triangle", add_special_tokens=False))] * 2
        out = reduce_images(features, [Layout(*LAYOUTS[size]) for size in sizes], settings, query,
                            embed_tokens=model.get_input_embeddings())
    newline = model.model.image_newline
    for rows, size in zip(out, sizes):
        assert rows.shape[0] == RESERVED[size]
        is_newline = (rows == newline).all(dim=-1)
        assert is_newline.tolist() == [False] * (RESERVED[size] - 1) + [True]


def test_reserved_rows_count_visual_tokens_only():
    from par_vllm.settings import ParSettings

    layout = Layout(*LAYOUTS[(672, 672)])
    assert layout.placeholders(ParSettings()) == RESERVED[(672, 672)]
    assert layout.placeholders(ParSettings(num_tokens=10)) == 11
    assert layout.placeholders(ParSettings(keep_ratio=1.0)) == layout.full  # nothing removed: as stock
    assert layout.placeholders(ParSettings(enabled=False)) == layout.full
    assert layout.placeholders(ParSettings(num_tokens=layout.num_visual)) == layout.full
    assert Layout(576).placeholders(ParSettings()) == 64  # LLaVA-1.5: no separators


def make_llm(model, overrides=None, **engine_args):
    return offline_engine.make_llm(model, overrides, max_model_len=8192, **engine_args)


def generate(llm, prompt, images, mm_kwargs=None):
    return offline_engine.generate(llm, prompt, images, mm_kwargs, logprobs=2)


@pytest.fixture(scope="module")
def runs(next_model):
    """Everything the engine tests check, from three engines: PAR (vLLM's positions on, as
    par-vllm serve starts it), PAR with the prefix cache on, and vLLM's own LLaVA-NeXT."""
    res = {}
    # A 4,096-token encoder budget (vLLM's follows --max-num-batched-tokens): the two images
    # below (2,928 + 2,340 tokens) go through the tower one at a time.
    llm = make_llm(next_model, par_overrides(architecture=NEXT), enable_prefix_caching=False,
                   max_num_batched_tokens=4096)
    for size in LAYOUTS:
        res["par", size] = generate(llm, PROMPT, image(size))
        res["whole", size] = generate(llm, PROMPT, image(size), {"par_keep_ratio": 1.0})
    res["off"] = generate(llm, PROMPT, image((640, 480)), {"par_enabled": False})
    res["par", "two"] = generate(llm, TWO_IMAGES, [image((672, 672)), image((640, 480))])
    res["whole", "two"] = generate(llm, TWO_IMAGES, [image((672, 672)), image((640, 480))], {"par_keep_ratio": 1.0})
    res["fresh"] = [generate(llm, q, image((672, 672))) for q in (PROMPT, OTHER)]
    try:
        generate(llm, PROMPT, image((672, 672)), {"par_keep_ratio": 2})
    except ValueError as error:
        res["bad"] = error
    res["after_bad"] = generate(llm, PROMPT, image((672, 672)))
    close(llm)
    llm = make_llm(next_model, par_overrides(architecture=NEXT), enable_prefix_caching=True)
    res["cached"] = [generate(llm, q, image((672, 672))) for q in (OTHER, PROMPT, OTHER, PROMPT)]
    res["conversation"] = [generate(llm, turn, image((672, 672))) for turn in CONVERSATION]
    res["conversation", "image"] = generate(llm, CONVERSATION[2], image((672, 672)), {"par_query_turn": "image"})
    res["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    close(llm)
    llm = make_llm(next_model)  # vLLM's own LlavaNextForConditionalGeneration
    for size in LAYOUTS:
        res["stock", size] = generate(llm, PROMPT, image(size))
    res["stock", "two"] = generate(llm, TWO_IMAGES, [image((672, 672)), image((640, 480))])
    close(llm)
    return res


def apart(a, b, tolerance=1e-4) -> bool:
    """Whether two answers differ by more than `same` tolerates."""
    if a.outputs[0].token_ids != b.outputs[0].token_ids:
        return True
    return any(abs(lp.logprob - step_b[token].logprob) >= tolerance
               for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)
               for token, lp in step_a.items() if token in step_b)


def test_the_tower_takes_images_in_groups_within_the_encoder_budget():
    """vLLM's scheduler counts an image's encoder work by its K placeholders, the tower runs
    on its N: images go through it in runs whose summed N fits the budget (one at least),
    when every field holds one entry per image; images the feature cache holds skip it."""
    import torch

    from par_vllm.models.base import _one_per_item, encoder_runs, tower_groups

    assert tower_groups([2928, 2340, 576], 4096) == [slice(0, 1), slice(1, 3)]
    assert tower_groups([576, 576, 576, 2928], 2048) == [slice(0, 3), slice(3, 4)]
    assert tower_groups([5000], 64) == [slice(0, 1)]
    per_image = {"pixel_values": [torch.zeros(5, 3, 2, 2), torch.zeros(1, 3, 2, 2)], "image_sizes": torch.zeros(2, 2)}
    assert all(_one_per_item(value, 2) for value in per_image.values())
    assert not _one_per_item(torch.zeros(6, 3, 2, 2), 2) and not _one_per_item(None, 2)  # packed rows; none
    tower = [(slice(0, 1), False), (slice(1, 2), False)]
    assert encoder_runs([900, 900], [False, False], 1000) == tower
    assert encoder_runs([900, 900], [False, False], 1000, per_item=False) == [(slice(0, 2), False)]
    # Cached items form runs of their own; both kinds keep to the budget.
    assert encoder_runs([576] * 6, [True, False, False, False, True, True], 1200) == [
        (slice(0, 1), True), (slice(1, 3), False), (slice(3, 4), False), (slice(4, 6), True)]
    assert encoder_runs([900] * 3, [True] * 3, 1000) == [(slice(i, i + 1), True) for i in range(3)]
    # Items that cannot be split skip the tower only if every one is cached.
    assert encoder_runs([900, 900], [True, False], 1000, per_item=False) == [(slice(0, 2), False)]
    assert encoder_runs([900, 900], [True, True], 1000, per_item=False) == [(slice(0, 2), True)]
    assert encoder_runs([], [], 1000) == []


@pytest.mark.slow
@pytest.mark.parametrize("size", LAYOUTS)
def test_each_image_reserves_k_visual_tokens_and_one_separator(runs, tokenizer, size):
    assert len(runs["par", size].prompt_token_ids) == text_tokens(tokenizer, PROMPT) + RESERVED[size]


@pytest.mark.slow
def test_two_images_of_different_shapes_each_get_their_own_k(runs, tokenizer):
    reserved = RESERVED[(672, 672)] + RESERVED[(640, 480)]
    assert len(runs["par", "two"].prompt_token_ids) == text_tokens(tokenizer, TWO_IMAGES) + reserved


@pytest.mark.slow
@pytest.mark.parametrize("size", [*LAYOUTS, "two"])
def test_nothing_removed_serves_exactly_as_vllms_own_llava_next(runs, size):
    same(runs["whole", size], runs["stock", size])


@pytest.mark.slow
def test_par_disabled_serves_exactly_as_vllms_own_llava_next(runs):
    same(runs["off"], runs["stock", (640, 480)])


@pytest.mark.slow
def test_the_prefix_cache_never_hands_one_prompts_image_tokens_to_another(runs):
    """The same image with two questions, asked in turn on an engine with the prefix cache on,
    answers each question as the cache-free engine did; the two questions' answers are
    further apart than the comparison's tolerance, so a shared cache entry would show."""
    fresh = dict(zip((PROMPT, OTHER), runs["fresh"]))
    assert apart(fresh[PROMPT], fresh[OTHER])
    for question, out in zip((OTHER, PROMPT, OTHER, PROMPT), runs["cached"]):
        same(out, fresh[question])


@pytest.mark.slow
def test_each_later_question_is_shown_the_image_again_with_its_separator(runs, tokenizer):
    """query_turn="image_and_latest" (the default): each later turn carries a view of the
    image reduced for it, K visual tokens and one separator as the image itself has, and
    keeps it in the turns after, so each prompt extends the previous one and the prefix
    cache holds all of its full blocks."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    turns = [out.prompt_token_ids for out in runs["conversation"]]
    assert [ids.count(image_id) for ids in turns] == [RESERVED[(672, 672)] * (i + 1) for i in range(3)]
    assert runs["conversation", "image"].prompt_token_ids.count(image_id) == RESERVED[(672, 672)]
    for before, after in zip(turns, turns[1:]):
        assert after[:len(before)] == before
    block = runs["block_size"]
    for before, later in zip(turns, runs["conversation"][1:]):
        assert later.num_cached_tokens >= len(before) // block * block > 0


@pytest.mark.slow
def test_a_bad_setting_is_refused_by_name_and_the_engine_keeps_serving(runs, tokenizer):
    assert "par_keep_ratio" in str(runs["bad"])
    assert runs["after_bad"].outputs[0].token_ids == runs["par", (672, 672)].outputs[0].token_ids


@pytest.fixture(scope="module")
def tokenizer(next_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(next_model)


def test_explain_draws_the_base_view_and_the_tiles_of_an_anyres_image(next_model, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from par_vllm.cli import main

    path = tmp_path / "wide.png"
    image((640, 480)).save(path)
    out = tmp_path / "kept.png"
    main(["explain", str(path), "What color is the triangle?", "--model", str(next_model), "--out", str(out),
          "--keep-ratio", "0.05"])
    assert capsys.readouterr().out.strip() == str(out)
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    # Two panels side by side: the base view's centre square (672 px) and the whole 4:3 image (672 px wide).
    assert drawn.shape == (672, 672 + 16 + 672, 3)
    tiles = drawn[:504, 672 + 16:]
    plain = np.asarray(image((640, 480)).resize((672, 504)), dtype=np.int16)
    changed = (np.abs(tiles - plain).sum(-1) > 30).mean()
    assert 0.3 < changed < 1.0, "the tiles' grid is drawn over the whole image"
