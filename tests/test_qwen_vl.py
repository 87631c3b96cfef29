"""Qwen2.5-VL, Qwen3-VL and Qwen3.5 with PAR, through a real vLLM engine, on tiny random-weight
models built here: K per image from the processor's own grid, equal to stock vLLM token for
token with nothing removed (chunked prefill included), every kept token at its full-image
(t, h, w) position, prefix-cache isolation, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from par_vllm.demo import demo_image
from par_vllm.server import CPU_ENV, par_overrides

import offline_engine
from offline_engine import close, same

ARCH = {"qwen2_5_vl": "ParQwen2_5_VLForConditionalGeneration", "qwen3_vl": "ParQwen3VLForConditionalGeneration",
        "qwen3_5": "ParQwen3_5ForConditionalGeneration"}
# vLLM's CPU Gated DeltaNet layers (Qwen3.5's linear attention) run in bfloat16 only.
DTYPE = {"qwen2_5_vl": "float32", "qwen3_vl": "float32", "qwen3_5": "bfloat16"}
# How far a log-probability may move when only the engine's schedule differs: other requests
# in the same steps, or the prefix cache on (vLLM then splits a hybrid model's prefill where
# its linear-attention state is cached, mamba_cache_mode "align"). In bfloat16 that moves
# log-probabilities by rounding (seen on a CPU with AVX-512 BF16); the tolerance stays under
# what a misplaced image moves (test_the_tiny_models_answers_depend_on_positions), and the
# tokens must match exactly.
SCHEDULE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# (width, height) -> N, as the family's processor counts it (2x2 merge of 14 or 16 px patches).
TOKENS = {
    "qwen2_5_vl": {(448, 448): 256, (224, 224): 64, (308, 448): 176, (448, 308): 176},
    "qwen3_vl": {(448, 448): 196, (224, 224): 49, (308, 448): 140, (448, 308): 140},
}
TOKENS["qwen3_5"] = TOKENS["qwen3_vl"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def chat(user: str, system: str = "You are a helpful assistant.") -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


ONE = chat(IMAGE + "What color is the triangle?")
OTHER = chat(IMAGE + "Where is the blue circle?")
TWO = chat(IMAGE + IMAGE + "Which shape is larger?")
LONG = chat(IMAGE + " ".join(["Describe the red square and the green circle and the blue star"] * 30))
# Two turns about one image, then the same with another later question.
CONVERSATIONS = [ONE + f"Red.<|im_end|>\n<|im_start|>user\n{later}<|im_end|>\n<|im_start|>assistant\n"
                 for later in ("Where is the blue circle?", "Is the star green?")]
# A third turn after the first conversation's second.
THIRD_TURN = CONVERSATIONS[0] + "Far right.<|im_end|>\n<|im_start|>user\nAnd the green triangle?<|im_end|>\n" \
    "<|im_start|>assistant\n"
SECOND_VIEW = {"par_query_turn": "image_and_latest"}
# (prompt, image sizes) checked against stock vLLM with nothing removed.
WHOLE = {"one": (ONE, [(448, 448)]), "portrait": (ONE, [(308, 448)]),
         "two": (TWO, [(448, 308), (224, 224)]), "long": (LONG, [(448, 448)])}


def image(size):
    return demo_image().resize(size)


@pytest.fixture(scope="module", params=list(ARCH))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory, family):
    from par_vllm.demo_qwen import make_demo_qwen_model

    return make_demo_qwen_model(tmp_path_factory.mktemp("models") / family, family=family)


def test_the_tiny_models_answers_depend_on_positions(qwen_model, family):
    """The equality tests below can only catch a misplaced token if moving the text after the
    image by one position changes what the model says: check it does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(qwen_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(qwen_model)
    inputs = processor(images=[image((308, 448))], text=ONE, return_tensors="pt", return_mm_token_type_ids=True)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    shifted = positions.clone()
    after = (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")).nonzero()[0, 0]
    shifted[:, :, after:] += 1
    args = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        right = model(**args, position_ids=positions).logits[0, -1].log_softmax(-1)
        moved = model(**args, position_ids=shifted).logits[0, -1].log_softmax(-1)
    assert (right - moved).abs().max() > 0.1  # far above the 1e-4 the equality tests allow


def make_llm(model, family, overrides=True, **engine_args):
    engine_args = {"limit_mm_per_prompt": {"image": 2, "video": 1}, **engine_args}
    if overrides:
        engine_args = {"worker_cls": "par_vllm.worker.ParWorker", **engine_args}
    return offline_engine.make_llm(model, par_overrides(architecture=ARCH[family]) if overrides else None,
                                   max_model_len=4096, dtype=DTYPE[family], **engine_args)


def generate(llm, prompt, sizes, mm_kwargs=None):
    return offline_engine.generate(llm, prompt, [image(s) for s in sizes], mm_kwargs, logprobs=2)


def batch(llm, requests):
    """Several requests handed to the engine at once, so that their prefill chunks and
    images share engine steps."""
    from vllm import SamplingParams

    return llm.generate([{"prompt": prompt, "multi_modal_data": {"image": [image(s) for s in sizes]}}
                         for prompt, sizes in requests],
                        SamplingParams(max_tokens=6, temperature=0.0, logprobs=2), use_tqdm=False)


VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


# Clips by (frames, side): two lengths and two resolutions (Qwen2.5-VL's video processor
# scales a 224 px frame up to 336).
CLIPS = [(8, 224), (4, 224), (8, 448)]


def clip(frames: int = 8, side: int = 224, fps: float = 2.0):
    """`frames` frames of the demo image turning, `side` px square, with the metadata Qwen's
    processors read."""
    import numpy as np

    pictures = np.stack([np.asarray(image((side, side)).rotate(10 * i)) for i in range(frames)]
                        or [np.zeros((side, side, 3), np.uint8)])[:frames]
    return pictures, {"fps": fps, "duration": frames / fps, "total_num_frames": frames,
                      "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}


def generate_video(llm, with_image: bool, mm_kwargs=None, question="What moves?", video=None):
    """A question about a video (after an image when with_image)."""
    from vllm import SamplingParams

    data = {"video": video or clip(), **({"image": image((308, 448))} if with_image else {})}
    request = {"prompt": chat((IMAGE if with_image else "") + VIDEO + question), "multi_modal_data": data}
    if mm_kwargs is not None:
        request["mm_processor_kwargs"] = mm_kwargs
    (out,) = llm.generate(request, SamplingParams(max_tokens=6, temperature=0.0, logprobs=2), use_tqdm=False)
    return out


def full_video_tokens(qwen_model, video) -> int:
    """N for a clip, from the family's own processor (transformers', not vLLM's)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen_model)
    frames, metadata = video
    out = processor(text=VIDEO, videos=[frames], video_metadata=[hf_metadata(metadata)], do_sample_frames=False,
                    return_tensors="pt")
    return int(out["video_grid_thw"].prod()) // 4


def hf_metadata(metadata: dict) -> dict:
    """vLLM's video metadata as transformers' processors take it (without vLLM's own keys)."""
    return {k: v for k, v in metadata.items() if k not in ("do_sample_frames", "video_backend")}


VIDEO_QUESTIONS = ("What moves?", "Is the star turning left?")


@pytest.fixture(scope="module")
def runs(qwen_model, family):
    """Everything the engine tests check, from four engines: PAR, PAR with 64-token prefill
    chunks, PAR with the prefix cache on, and vLLM's own model."""
    res = {}
    llm = make_llm(qwen_model, family, enable_prefix_caching=False)
    for size in TOKENS[family]:
        res["par", size] = generate(llm, ONE, [size])
    res["par", "two"] = generate(llm, TWO, [(448, 308), (224, 224)])
    res["capped"] = generate(llm, TWO, [(448, 308), (224, 224)], {"par_num_tokens": 50})
    res["consecutive"] = generate(llm, ONE, [(448, 448)], {"par_positions": "consecutive"})
    for name, (prompt, sizes) in WHOLE.items():
        res["whole", name] = generate(llm, prompt, sizes, {"par_keep_ratio": 1.0})
    res["fresh"] = [generate(llm, q, [(448, 448)]) for q in (ONE, OTHER)]
    res["fresh_second_view"] = [generate(llm, c, [(448, 448)], SECOND_VIEW) for c in CONVERSATIONS]
    res["fresh_third_turn"] = generate(llm, THIRD_TURN, [(448, 448)], SECOND_VIEW)
    res["image_rule"] = generate(llm, CONVERSATIONS[0], [(448, 448)], {"par_query_turn": "image"})
    for bad in ({"par_keep_ratio": 2}, {"par_positions": "sideways"}):
        try:
            generate(llm, ONE, [(448, 448)], bad)
        except ValueError as error:
            res.setdefault("bad", []).append(error)
    res["after_bad"] = generate(llm, ONE, [(448, 448)])
    for frames, side in CLIPS:
        res["video", frames, side] = generate_video(llm, False, video=clip(frames, side))
    res["fresh_video"] = [generate_video(llm, False, question=q) for q in VIDEO_QUESTIONS]
    res["bad_video"] = {name: capture(lambda video=video: generate_video(llm, False, video=video))
                        for name, video in [("long", clip(200, 448)), ("empty", clip(0))]}
    res["after_bad_video"] = generate_video(llm, False)
    res["evs"] = capture(lambda: generate_video(llm, False, {"par_method": "evs", "par_keep_ratio": 0.5}))
    res["evs", "par"] = generate_video(llm, False, {"par_keep_ratio": 0.5})
    res["evs", "below a frame"] = capture(lambda: generate_video(llm, False, {"par_method": "evs"}))
    res["evs", "image"] = capture(lambda: generate_video(llm, True, {"par_method": "evs", "par_keep_ratio": 0.5}))
    res["frames"] = generate_video(llm, False, {"par_method": "frames", "par_keep_ratio": 0.5})
    res["frames", "image"] = capture(lambda: generate_video(llm, True, {"par_method": "frames", "par_keep_ratio": 0.5}))
    close(llm)
    llm = make_llm(qwen_model, family, enable_prefix_caching=False, max_num_batched_tokens=64)
    for name, (prompt, sizes) in WHOLE.items():
        res["whole64", name] = generate(llm, prompt, sizes, {"par_keep_ratio": 1.0})
    res["par64", "two"] = generate(llm, TWO, [(448, 308), (224, 224)])
    res["par64", "batch"] = batch(llm, [(ONE, [(448, 448)]), (TWO, [(448, 308), (224, 224)]), (ONE, [(308, 448)])])
    res["par64", "video"] = generate_video(llm, False)
    res["whole64", "video"] = generate_video(llm, False, {"par_keep_ratio": 1.0})
    res["par64", "image+video"] = generate_video(llm, True, {"par_keep_ratio": 1.0})
    res["par64", "reduced+video"] = generate_video(llm, True)
    close(llm)
    # Blocks shorter than the CPU default's, so that these short prompts fill some.
    llm = make_llm(qwen_model, family, enable_prefix_caching=True, block_size=32)
    res["cached"] = [generate(llm, q, [(448, 448)]) for q in (OTHER, ONE, OTHER, ONE)]
    res["cached_second_view"] = [generate(llm, CONVERSATIONS[i], [(448, 448)], SECOND_VIEW) for i in (1, 0, 1, 0)]
    res["cached_third_turn"] = generate(llm, THIRD_TURN, [(448, 448)], SECOND_VIEW)
    res["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    res["cached_video"] = [generate_video(llm, False, question=VIDEO_QUESTIONS[i]) for i in (1, 0, 1, 0)]
    close(llm)
    # vLLM's own model class, its prefix cache off as in the PAR engines it is compared with:
    # KV that another request's prefill computed can differ in its last bits from this
    # request's own (seen with Qwen3.5 in bfloat16 on a CPU without AVX-512).
    llm = make_llm(qwen_model, family, overrides=False, enable_prefix_caching=False)
    for name, (prompt, sizes) in WHOLE.items():
        res["stock", name] = generate(llm, prompt, sizes)
    res["stock", "video"] = generate_video(llm, False)
    res["stock", "image+video"] = generate_video(llm, True)
    close(llm)
    llm = make_llm(qwen_model, family, overrides=False, enable_prefix_caching=False, max_num_batched_tokens=64)
    for name, (prompt, sizes) in WHOLE.items():
        res["stock64", name] = generate(llm, prompt, sizes)
    close(llm)
    return res


def capture(request):
    """A request's output, or the error the engine refused it with (vLLM's validation
    errors are not ValueErrors)."""
    from vllm.exceptions import VLLMValidationError

    try:
        return request()
    except (ValueError, VLLMValidationError) as error:
        return error


def image_tokens(out, tokenizer) -> int:
    return out.prompt_token_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>"))


@pytest.fixture(scope="module")
def tokenizer(qwen_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_model)


@pytest.mark.slow
def test_each_image_reserves_k_of_the_processors_n(runs, tokenizer, family):
    """Landscape, portrait, square and small images: K = ceil(N x 0.111) placeholders, N from
    the processor's grid; two images of different sizes each get their own K; par_num_tokens
    caps each image."""
    for size, full in TOKENS[family].items():
        assert image_tokens(runs["par", size], tokenizer) == math.ceil(full * 0.111)
    landscape, small = TOKENS[family][(448, 308)], TOKENS[family][(224, 224)]
    assert image_tokens(runs["par", "two"], tokenizer) == math.ceil(landscape * 0.111) + math.ceil(small * 0.111)
    assert image_tokens(runs["capped"], tokenizer) == 50 + min(50, small)
    assert image_tokens(runs["consecutive"], tokenizer) == math.ceil(TOKENS[family][(448, 448)] * 0.111)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WHOLE))
def test_with_nothing_removed_outputs_equal_stock_vllm(runs, name):
    """At par_keep_ratio 1.0, through the PAR path (worker, position placement): prompt
    tokens, greedy tokens and log-probabilities equal vLLM's own model's, with whole-prompt
    prefill and with 64-token chunks that split inside and right after images (against
    vLLM's own model in the same chunks)."""
    same(runs["whole", name], runs["stock", name])
    same(runs["whole64", name], runs["stock64", name])


def video_tokens(out, tokenizer) -> int:
    return out.prompt_token_ids.count(tokenizer.convert_tokens_to_ids("<|video_pad|>"))


def frame_runs(ids, tokenizer) -> list[int]:
    """How many <|video_pad|> each innermost <|vision_start|> ... <|vision_end|> of a prompt
    holds, of those that hold nothing else (Qwen3-VL writes one per frame of a video)."""
    start, end, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>",
                                                                    "<|video_pad|>"))
    counts, inside = [], None
    for token in ids:
        if token == start:
            inside = []
        elif token == end:
            if inside is not None and all(t == pad for t in inside):
                counts.append(len(inside))
            inside = None
        elif inside is not None:
            inside.append(token)
    return counts


@pytest.mark.slow
def test_with_nothing_removed_videos_equal_stock_vllm(runs):
    """At par_keep_ratio 1.0 a video alone, and a video after an image, equal stock vLLM
    token for token, in 64-token prefill chunks that split inside the video."""
    same(runs["whole64", "video"], runs["stock", "video"])
    same(runs["par64", "image+video"], runs["stock", "image+video"])


@pytest.mark.slow
def test_each_video_reserves_k_of_the_processors_n(runs, tokenizer, family, qwen_model):
    """Each clip (two lengths, two resolutions) reserves K = ceil(N x 0.111) of the N its
    processor counts, and a video after an image gets its own K beside the image's. Qwen3-VL
    and Qwen3.5 write a video as one run per frame after its timestamp: every frame keeps
    its timestamp and markers, and the K placeholders sit in the first frame's run."""
    for frames, side in CLIPS:
        full = full_video_tokens(qwen_model, clip(frames, side))
        out = runs["video", frames, side]
        assert video_tokens(out, tokenizer) == math.ceil(full * 0.111), (frames, side)
        if family != "qwen2_5_vl":
            assert frame_runs(out.prompt_token_ids, tokenizer) == [math.ceil(full * 0.111)] + [0] * (frames // 2 - 1)
    if family != "qwen2_5_vl":  # the stock prompt: one run per frame pair
        full = full_video_tokens(qwen_model, clip())
        assert frame_runs(runs["stock", "video"].prompt_token_ids, tokenizer) == [full // 4] * 4
    sizes = {clip_size: full_video_tokens(qwen_model, clip(*clip_size)) for clip_size in CLIPS}
    assert len(set(sizes.values())) == len(CLIPS)  # the clips differ in N
    both, whole = runs["par64", "reduced+video"], runs["stock", "image+video"]
    assert video_tokens(both, tokenizer) == math.ceil(video_tokens(whole, tokenizer) * 0.111)
    assert image_tokens(both, tokenizer) == math.ceil(TOKENS[family][(308, 448)] * 0.111)


@pytest.mark.slow
def test_bad_videos_are_refused_and_the_engine_keeps_serving(runs, family, tokenizer, qwen_model):
    """A clip of no frames is refused; on Qwen2.5-VL, so is a clip longer than vLLM sized the
    vision encoder for (its profile's largest item: a reduced video's few placeholders would
    otherwise let it through). Qwen3-VL's video processor shrinks a long clip's frames to
    its own total-pixel budget instead, so the clip is served, reduced from the N that
    processor counts. The next request is answered as before."""
    from vllm.exceptions import VLLMValidationError

    long, empty = runs["bad_video"]["long"], runs["bad_video"]["empty"]
    assert isinstance(empty, VLLMValidationError) and "no frames" in str(empty)
    if family == "qwen2_5_vl":
        assert isinstance(long, VLLMValidationError) and "fewer frames" in str(long)
    else:
        assert video_tokens(long, tokenizer) == math.ceil(full_video_tokens(qwen_model, clip(200, 448)) * 0.111)
    same(runs["after_bad_video"], runs["video", 8, 224])


@pytest.mark.slow
def test_evs_selects_a_videos_tokens_at_the_requests_budget(runs, tokenizer, family, qwen_model):
    """par_method="evs" runs vLLM's own EVS on a video at the request's K (an answer of its
    own, not PAR's at the same K); a K below one frame's tokens (EVS keeps the first frame
    whole) and an image are refused naming the setting."""
    evs, par = runs["evs"], runs["evs", "par"]
    assert video_tokens(evs, tokenizer) == video_tokens(par, tokenizer) == math.ceil(
        full_video_tokens(qwen_model, clip()) * 0.5)
    assert evs.outputs[0].token_ids != par.outputs[0].token_ids or any(
        abs(a[t].logprob - b[t].logprob) > 1e-3
        for a, b in zip(evs.outputs[0].logprobs, par.outputs[0].logprobs) for t in a if t in b)
    below, image = runs["evs", "below a frame"], runs["evs", "image"]
    assert isinstance(below, ValueError) and "par_keep_ratio" in str(below) and "first frame" in str(below)
    assert isinstance(image, ValueError) and "par_method" in str(image) and "image" in str(image)


@pytest.mark.slow
def test_frame_dropping_keeps_a_videos_budget_and_refuses_images(runs, tokenizer, qwen_model):
    """par_method="frames" (uniform frame dropping) keeps the request's K of a video, an
    answer of its own; an image is refused naming the setting."""
    frames, par, image = runs["frames"], runs["evs", "par"], runs["frames", "image"]
    assert video_tokens(frames, tokenizer) == math.ceil(full_video_tokens(qwen_model, clip()) * 0.5)
    assert frames.outputs[0].token_ids != par.outputs[0].token_ids or any(
        abs(a[t].logprob - b[t].logprob) > 1e-3
        for a, b in zip(frames.outputs[0].logprobs, par.outputs[0].logprobs) for t in a if t in b)
    assert isinstance(image, ValueError) and "par_method" in str(image) and "frames" in str(image)


@pytest.mark.slow
def test_reduced_videos_do_not_depend_on_prefill_chunks_and_keep_to_their_prompt(runs, family):
    """A reduced video answers the same in 64-token chunks as with whole prefill; with the
    prefix cache on, the same video under two prompts, alternating, answers each prompt as
    a cache-free engine does."""
    same(runs["par64", "video"], runs["video", 8, 224])
    for out, expected in zip(runs["cached_video"], [runs["fresh_video"][i] for i in (1, 0, 1, 0)]):
        same(out, expected, SCHEDULE_TOLERANCE[DTYPE[family]])


@pytest.mark.slow
def test_reduced_outputs_do_not_depend_on_prefill_chunks_or_other_requests(runs, family):
    """Reduced, a request answers the same alone with whole prefill as in 64-token chunks
    sharing engine steps with other requests (SCHEDULE_TOLERANCE)."""
    tolerance = SCHEDULE_TOLERANCE[DTYPE[family]]
    same(runs["par64", "two"], runs["par", "two"], tolerance)
    one, two, portrait = runs["par64", "batch"]
    same(one, runs["par", (448, 448)], tolerance)
    same(two, runs["par", "two"], tolerance)
    same(portrait, runs["par", (308, 448)], tolerance)


@pytest.mark.slow
def test_positions_setting_changes_the_answer(runs):
    """Consecutive positions are a different placement, not the same one by another name."""
    a, b = runs["consecutive"], runs["par", (448, 448)]
    assert a.prompt_token_ids == b.prompt_token_ids
    assert any(abs(lp.logprob - step_b[t].logprob) > 1e-3
               for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)
               for t, lp in step_a.items() if t in step_b) or a.outputs[0].token_ids != b.outputs[0].token_ids


@pytest.mark.slow
def test_prefix_cache_never_hands_one_prompts_tokens_to_another(runs, family):
    """The same image under two prompts, alternating with the prefix cache on: each answer
    equals that prompt's answer from a cache-free engine."""
    other, one = runs["fresh"][1], runs["fresh"][0]
    for out, expected in zip(runs["cached"], (other, one, other, one)):
        same(out, expected, SCHEDULE_TOLERANCE[DTYPE[family]])


@pytest.mark.slow
def test_each_later_question_is_shown_the_image_again_at_its_turn(runs, tokenizer, family):
    """query_turn="image_and_latest": each later turn carries a view of the image of its
    own, K more placeholders between <|vision_start|> and <|vision_end|> at the start of its
    user message, kept in the turns after; the first view is as under "image". With the
    prefix cache on, alternating two later questions about the same image, each answer
    equals the cache-free one, and the third turn finds the whole second turn's prompt
    (the last request before it) in the prefix cache."""
    k = math.ceil(TOKENS[family][(448, 448)] * 0.111)
    image_rule, second, third = runs["image_rule"], runs["fresh_second_view"][0], runs["fresh_third_turn"]
    assert image_tokens(image_rule, tokenizer) == k and image_tokens(second, tokenizer) == 2 * k
    assert image_tokens(third, tokenizer) == 3 * k
    ids = second.prompt_token_ids
    opening = tokenizer.encode("<|im_start|>user\n<|vision_start|>")
    starts = [i for i in range(len(ids)) if ids[i:i + len(opening)] == opening]
    assert len(starts) == 2  # the first user message and the newest
    # Without its second view the prompt is the "image" rule's, token for token.
    view = list(range(starts[1] + len(opening) - 1, starts[1] + len(opening) + k + 1))
    assert [t for i, t in enumerate(ids) if i not in view] == image_rule.prompt_token_ids
    # The third turn's prompt is the second's with the reply and the third question after it.
    assert third.prompt_token_ids[:len(ids)] == ids
    for out, expected in zip(runs["cached_second_view"], runs["fresh_second_view"][::-1] * 2):
        same(out, expected, SCHEDULE_TOLERANCE[DTYPE[family]])
    same(runs["cached_third_turn"], third, SCHEDULE_TOLERANCE[DTYPE[family]])
    block = runs["block_size"]
    assert runs["cached_third_turn"].num_cached_tokens >= len(ids) // block * block > 0


@pytest.mark.slow
def test_bad_settings_are_refused_naming_them_and_the_engine_keeps_serving(runs):
    messages = [str(error) for error in runs["bad"]]
    assert len(messages) == 2
    assert "par_keep_ratio" in messages[0] and "par_positions" in messages[1]
    same(runs["after_bad"], runs["fresh"][0])


def filler_prompt(tokenizer, vision_start_at: int, question: str) -> str:
    """A prompt whose <|vision_start|> is token `vision_start_at`, so that 64-token prefill
    chunks split just before it, right after it, or inside the image."""
    head = "<|im_start|>user\n"
    n = vision_start_at - len(tokenizer.encode(head))
    prompt = head + " a" * n + IMAGE + question + "<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode(prompt).index(tokenizer.convert_tokens_to_ids("<|vision_start|>")) == vision_start_at
    return prompt


@pytest.mark.slow
def test_every_kept_token_sits_at_its_full_image_position(qwen_model, family, tokenizer, tmp_path):
    """Read from the engine's model runner after prefill, in 64-token chunks split before,
    right after and inside an image, for two images (a portrait and a square), one, and an
    image and a video: each kept token's (t, h, w) position equals the one transformers' own
    Qwen code gives that token in the unreduced prompt, and every text token's equals its
    unreduced one, also with the video's repeats not merged first. Items above vLLM's encoder
    budget pass through the tower one at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sizes = {"portrait": (308, 448), "square": (448, 448)}
    paths = {}
    for name, size in sizes.items():
        paths[name] = tmp_path / f"{name}.png"
        image(size).save(paths[name])
    requests = [{"prompt": chat(IMAGE + "Where is the star? " + IMAGE + "Which is larger?"),
                 "images": [str(paths["portrait"]), str(paths["square"])]}]
    # Different questions: the same image and query would reuse the encoder's cached rows
    # instead of being reduced again (and logged).
    questions = {62: "What shape is at the top?", 63: "Where is the red square?", 64: "Is the circle green?"}
    requests += [{"prompt": filler_prompt(tokenizer, at, question), "images": [str(paths["portrait"])]}
                 for at, question in questions.items()]
    # A video after an image, at 3 frames a second: in Qwen2.5-VL its t step (2/3 s per
    # frame pair x tokens_per_second) is not whole, so the rounding of every t is checked
    # too; in Qwen3-VL each frame's grid sits after its own timestamp's text.
    import numpy as np

    frames, metadata = clip(8, 224, fps=3.0)
    np.save(tmp_path / "clip.npy", frames)
    requests.append({"prompt": chat(IMAGE + "Where is the star? " + VIDEO + "What moves?"),
                     "images": [str(paths["portrait"])],
                     "video": {"frames": str(tmp_path / "clip.npy"), "metadata": metadata}})
    # The video's repeats are merged first (par_merge_repeats, the default): its kept tokens
    # are the distinct ones PAR chose, and the repeats it kept where too few were distinct.
    # The same without: PAR over every token of the clip.
    requests.append({**requests[-1], "mm_processor_kwargs": {"par_merge_repeats": False}})
    # The feature cache off: every item goes through the tower, to be counted below.
    results = probe(qwen_model, family, requests, tmp_path, chunk=64, feature_cache_mb=0)

    model = AutoModelForImageTextToText.from_pretrained(qwen_model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(qwen_model)
    pads = {tokenizer.convert_tokens_to_ids("<|image_pad|>"), tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    handed_together = False
    for request, result in zip(requests, results):
        import numpy as np
        from PIL import Image

        video = {}
        if "video" in request:
            video = {"videos": [np.load(request["video"]["frames"])], "video_metadata": [hf_metadata(request["video"]["metadata"])],
                     "do_sample_frames": False}
        full = processor(images=[Image.open(p).convert("RGB") for p in request["images"]], text=request["prompt"],
                         return_tensors="pt", return_mm_token_type_ids=True, **video)
        expected, _ = model.model.get_rope_index(
            full["input_ids"], full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"],
            video_grid_thw=full.get("video_grid_thw"), second_per_grid_ts=full.get("second_per_grid_ts"))
        expected, full_ids = expected[:, 0], full["input_ids"][0].tolist()
        got, ids = torch.tensor(result["positions"]), result["prompt_token_ids"]
        assert result["steps"] > 1  # the prefill was split
        # Text (a Qwen3-VL video's timestamps and markers included) at its unreduced positions.
        text = [i for i, t in enumerate(ids) if t not in pads]
        full_text = [k for k, t in enumerate(full_ids) if t not in pads]
        assert [ids[i] for i in text] == [full_ids[k] for k in full_text]
        assert torch.equal(got[:, text], expected[:, full_text])
        # Each item's kept tokens (one run in the reduced prompt) at their places among its N
        # (images first, then the video, as in these prompts).
        sizes = [int(g.prod()) // 4 for g in [*full["image_grid_thw"], *full.get("video_grid_thw", [])]]
        full_pads = [k for k, t in enumerate(full_ids) if t in pads]
        items = [full_pads[sum(sizes[:n]):sum(sizes[:n + 1])] for n in range(len(sizes))]
        pad_at = [i for i, t in enumerate(ids) if t in pads]
        reduced_runs, run = [], []
        for i in pad_at:
            if run and i != run[-1] + 1:
                reduced_runs.append(run)
                run = []
            run.append(i)
        reduced_runs.append(run)
        assert len(reduced_runs) == len(items) == len(result["kept"])
        for run, item, kept in zip(reduced_runs, items, result["kept"]):
            assert len(run) == len(kept) < len(item)
            assert torch.equal(got[:, run], expected[:, [item[k] for k in kept]])
        # vLLM's encoder budget here is 64 visual tokens (max_num_encoder_input_tokens follows
        # --max-num-batched-tokens): every item above it runs through the tower alone, even
        # when vLLM hands over several at once (it counts their K placeholders, not their N).
        calls = result["tower_runs"]
        assert sorted(n for call in calls for tower_run in call for n in tower_run) == sorted(sizes)
        assert all(len(tower_run) == 1 for call in calls for tower_run in call)
        handed_together |= any(len(call) > 1 for call in calls)
    assert handed_together  # or the line above checks nothing
    assert results[-1]["kept"][-1] != results[-2]["kept"][-1]  # the repeats were merged


def probe(qwen_model, family, requests, tmp_path, chunk, feature_cache_mb) -> list[dict]:
    """tests/qwen_positions_probe.py's report on `requests` (dicts of a prompt, image paths and
    perhaps a video), from an engine with these prefill chunks and feature cache."""
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    script = Path(__file__).with_name("qwen_positions_probe.py")
    done = subprocess.run([sys.executable, str(script), str(qwen_model), ARCH[family], str(chunk), "0.111",
                           str(tmp_path / "requests.json"), DTYPE[family], str(feature_cache_mb)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **CPU_ENV})
    line = [x for x in done.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, done.stderr[-3000:]
    return json.loads(line[0][len("PROBE "):])


@pytest.mark.slow
def test_a_later_question_about_the_same_image_or_video_skips_the_tower(qwen_model, family, tmp_path):
    """The feature cache: an image or video already encoded, sent again under another
    question (which vLLM's own caches key apart), is reduced from the tower's rows kept by
    its content, not encoded again; an image it has not seen beside it still is. Kept
    tokens, positions and the first answer token's log-probabilities equal an engine's
    without the cache, request by request."""
    import numpy as np

    paths = {}
    for name, size in {"portrait": (308, 448), "square": (448, 448)}.items():
        paths[name] = str(tmp_path / f"{name}.png")
        image(size).save(paths[name])
    frames, metadata = clip(4, 224)
    np.save(tmp_path / "clip.npy", frames)
    video = {"frames": str(tmp_path / "clip.npy"), "metadata": metadata}
    requests = [{"prompt": chat(IMAGE + "Where is the star?"), "images": [paths["portrait"]]},
                {"prompt": chat(IMAGE + "Is the circle green?"), "images": [paths["portrait"]]},
                {"prompt": chat(IMAGE + "Which is red? " + IMAGE + "And here?"),
                 "images": [paths["square"], paths["portrait"]]},
                {"prompt": chat(VIDEO + "What moves?"), "images": [], "video": video},
                {"prompt": chat(VIDEO + "Is the star turning left?"), "images": [], "video": video}]
    cached = probe(qwen_model, family, requests, tmp_path, chunk=2048, feature_cache_mb=64)
    uncached = probe(qwen_model, family, requests, tmp_path, chunk=2048, feature_cache_mb=0)
    sizes = {"portrait": TOKENS[family][(308, 448)], "square": TOKENS[family][(448, 448)]}

    def encoded(result):
        return sorted(n for call in result["tower_runs"] for tower_run in call for n in tower_run)

    assert [encoded(r) for r in cached[:3]] == [[sizes["portrait"]], [], [sizes["square"]]]
    assert encoded(cached[4]) == [] and len(encoded(cached[3])) == 1
    assert [encoded(r) for r in uncached[1:3]] == [[sizes["portrait"]], sorted(sizes.values())]
    assert encoded(uncached[4]) == encoded(cached[3])
    for a, b in zip(cached, uncached):
        assert a["prompt_token_ids"] == b["prompt_token_ids"] and a["kept"] == b["kept"]
        assert a["positions"] == b["positions"]
        assert a["first"].keys() == b["first"].keys()
        assert all(abs(a["first"][t] - b["first"][t]) < 1e-4 for t in a["first"])


@pytest.mark.parametrize("worker, pruning, refused", [
    ("auto", None, "--worker-cls par_vllm.worker.ParWorker"),
    ("vllm.v1.worker.cpu_worker.CPUWorker", None, "--worker-cls par_vllm.worker.ParWorker"),
    ("par_vllm.worker.ParWorker", 0.5, "--video-pruning-rate"),
    ("par_vllm.worker.ParWorker", None, None),
])
def test_the_model_refuses_to_start_without_what_it_needs(worker, pruning, refused):
    """What a Qwen PAR model checks before it is built: the plugin's worker (which switches
    vLLM's placement path on) and no EVS on the same model; the message names the flag."""
    from types import SimpleNamespace

    from par_vllm.models.qwen_vl import ParQwenModel
    from par_vllm.settings import ParSettingError, ParSettings

    config = SimpleNamespace(
        parallel_config=SimpleNamespace(worker_cls=worker),
        model_config=SimpleNamespace(get_multimodal_config=lambda: SimpleNamespace(video_pruning_rate=pruning)))
    if refused is None:
        assert ParQwenModel.prepare_positions(config, ParSettings()) is True
        return
    with pytest.raises(ParSettingError, match=refused):
        ParQwenModel.prepare_positions(config, ParSettings())


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    """vLLM's own OpenAI server with the PAR Qwen2.5-VL class, started with exactly what
    `par-vllm serve` adds: the architecture in --hf-overrides and the worker."""
    from par_vllm.demo_qwen import make_demo_qwen_model
    from par_vllm.server import VllmServer, par_engine_args

    import test_server

    model = make_demo_qwen_model(tmp_path_factory.mktemp("models") / "server", family="qwen2_5_vl")
    architecture = ARCH["qwen2_5_vl"]
    args = [*test_server.SERVER_ARGS, *test_server.CACHING_OFF, "--max-model-len", "4096",
            "--limit-mm-per-prompt", '{"image": 2, "video": 1}', *par_engine_args(architecture)]
    with VllmServer(model, hf_overrides=par_overrides(architecture=architecture), extra_args=args,
                    env=test_server.PLUGINS) as server:
        yield server


@pytest.mark.slow
def test_qwen_server_reduces_and_counts_and_refuses_bad_settings(qwen_server):
    """Through /v1/chat/completions: K per image from the default ratio and from a request's
    setting, the PAR metrics, /v1/par/config, a 400 naming a bad setting, one saying why
    the image processor refused an image, and the server still answering after them."""
    import openai

    from par_vllm.demo import chat_messages
    from par_vllm.settings import ParSettings

    from test_server import ask, metric, par_samples

    messages = chat_messages("What color is the triangle?", image((308, 448)))
    before = par_samples(qwen_server)
    default = ask(qwen_server, messages)
    half = ask(qwen_server, messages, mm_processor_kwargs={"par_keep_ratio": 0.5})
    assert default["image_tokens"] == math.ceil(176 * 0.111) and half["image_tokens"] == 88
    after = par_samples(qwen_server)
    assert metric(after, "par_visual_tokens_before_total") - metric(before, "par_visual_tokens_before_total") == 352
    assert (metric(after, "par_visual_tokens_after_total") - metric(before, "par_visual_tokens_after_total")
            == default["image_tokens"] + 88)
    config = json.loads(qwen_server.get("/v1/par/config"))
    assert config["par_active"] is True and config["settings"] == ParSettings(positions="span").to_keys()
    with pytest.raises(openai.BadRequestError) as info:
        ask(qwen_server, messages, mm_processor_kwargs={"par_keep_ratio": 0})
    assert info.value.status_code == 400 and "par_keep_ratio" in info.value.message
    # Qwen's image processor takes no image whose sides differ more than 200-fold; the 400
    # says so rather than only that the processor failed.
    with pytest.raises(openai.BadRequestError) as info:
        ask(qwen_server, chat_messages("What color is the triangle?", image((4, 900))))
    assert info.value.status_code == 400 and "aspect ratio must be smaller than 200" in info.value.message
    assert ask(qwen_server, messages) == default


def clip_url(frames: int = 8, side: int = 224) -> str:
    """clip() as an MP4 data URL."""
    from par_vllm.demo import video_data_url

    return video_data_url(clip(frames, side)[0])


def video_message(url: str, question: str = "What moves?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.mark.slow
def test_qwen_server_reduces_videos_counts_them_apart_and_survives_bad_ones(qwen_server):
    """Over HTTP: a video's K from the default ratio, PAR's metrics for it under
    modality="video" (images' untouched), a 400 for a corrupt clip and for an empty one, an
    error for a one-frame clip, and the same answer to the first request after them."""
    import openai

    from test_server import ask, metric, par_samples, same_answer

    messages = video_message(clip_url())
    before = par_samples(qwen_server)
    first = ask(qwen_server, messages)
    after = par_samples(qwen_server)
    counted = {name: metric(after, name, "video") - metric(before, name, "video")
               for name in ("par_visual_tokens_before_total", "par_visual_tokens_after_total")}
    assert counted["par_visual_tokens_after_total"] == first["video_tokens"] > 0
    assert counted["par_visual_tokens_after_total"] == math.ceil(counted["par_visual_tokens_before_total"] * 0.111)
    assert metric(after, "par_visual_tokens_before_total", "image") == metric(
        before, "par_visual_tokens_before_total", "image")
    for bad in ("data:video/mp4;base64," + "AAAA" * 64, clip_url(frames=0)):
        with pytest.raises(openai.BadRequestError) as info:
            ask(qwen_server, video_message(bad))
        assert info.value.status_code == 400
    # vLLM's own Qwen2-VL video loader fails on a one-frame clip with a 500 before any
    # processor runs (docs/how-it-works.md); what matters here is that the server goes on.
    with pytest.raises(openai.APIStatusError):
        ask(qwen_server, video_message(clip_url(frames=1)))
    same_answer(ask(qwen_server, messages), first)


def test_the_worker_switches_on_placement_in_either_vllm_runner():
    """vLLM's V1 runner (the CPU build's) keeps the switch as a flag; the V2 runner (the GPU
    build's default where Triton is installed) as a MultiModalPruner in its model state.
    Models that do not ask are left alone."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    from par_vllm.worker import enable_row_placement

    asks, other = SimpleNamespace(par_places_rows=True), SimpleNamespace()
    v1 = SimpleNamespace(get_model=lambda: asks, is_multimodal_pruning_enabled=False)
    enable_row_placement(v1)
    assert v1.is_multimodal_pruning_enabled is True
    untouched = SimpleNamespace(get_model=lambda: other, is_multimodal_pruning_enabled=False)
    enable_row_placement(untouched)
    assert untouched.is_multimodal_pruning_enabled is False
    state = SimpleNamespace(mm_pruner=None, rope_state=object(), encoder_cache=object())
    v2 = SimpleNamespace(get_model=lambda: asks, model_state=state,
                         model_config=SimpleNamespace(get_inputs_embeds_size=lambda: 128))
    enable_row_placement(v2)
    assert isinstance(state.mm_pruner, MultiModalPruner) and state.mm_pruner.model is asks
    assert state.mm_pruner.inputs_embeds_size == 128


def test_video_metrics_remember_n_for_videos_vllm_hands_back_from_its_cache():
    """vLLM's processor cache hands a repeated video back with no fields: its N for the
    metrics is the one seen when it was processed; a video never seen counts as served
    whole rather than failing the request."""
    from types import SimpleNamespace

    from par_vllm.models.base import FIELDS, Layout
    from par_vllm.models.qwen_vl import ParQwen2_5_VLMultiModalProcessor

    processor = object.__new__(ParQwen2_5_VLMultiModalProcessor)
    packed = {FIELDS["video"].layout: SimpleNamespace(data=Layout(576).pack())}

    def result(items, hashes, kept):
        return {"mm_kwargs": {"video": items}, "mm_hashes": {"video": hashes},
                "mm_placeholders": {"video": [SimpleNamespace(get_num_embeds=lambda k=k: k) for k in kept]}}

    assert processor._item_sizes("video", None, result([packed], ["a"], [64])) == ([576], [64])
    assert processor._item_sizes("video", None, result([None, None], ["a", "b"], [64, 30])) == ([576, 30], [64, 30])
