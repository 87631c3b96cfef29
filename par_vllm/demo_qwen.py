"""Build small random-weight Qwen2.5-VL and Qwen3-VL models offline, in the layout `vllm
serve` loads: the real processors (dynamic resolution, 2x2 merge), ChatML with Qwen's
vision tokens and default system prompt, a tiny language model with M-RoPE.

A tiny random model with Qwen's own RoPE base (1e6) and 0.02 initialiser answers the same
whatever the positions, so tests could not tell a misplaced token. These models use a
small RoPE base and larger weights, so their greedy answers depend on where every token
sits (tests/test_qwen_vl.py checks this before trusting an equality).
"""

from __future__ import annotations

from pathlib import Path

from .demo_model import _save, train_bpe

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL's chat template (content as a string or as parts), with its default system prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")


def build_tokenizer(vocab_size: int = 1024):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(CHAT_TOKENS + VISION_TOKENS, vocab_size), eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        chat_template=CHAT_TEMPLATE)


def make_demo_qwen_model(
    out_dir: str | Path,
    *,
    family: str = "qwen2_5_vl",
    text_hidden: int = 128,
    vision_hidden: int = 64,
    num_layers: int = 2,
    rope_theta: float = 100.0,
    init_std: float = 0.1,
    seed: int = 0,
) -> Path:
    """Save a random-weight Qwen2.5-VL (`family="qwen2_5_vl"`), Qwen3-VL (`"qwen3_vl"`) or
    Qwen3.5 (`"qwen3_5"`: Qwen3-VL's vision side before a hybrid language model, three
    Gated DeltaNet layers alternating with full attention) to out_dir and return the path."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family: one of {', '.join(FAMILIES)}, not {family!r}")
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    head_dim = 64  # vLLM's CPU paged attention supports head_dim 64, not tiny ones
    text = dict(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
        num_hidden_layers=num_layers, num_attention_heads=text_hidden // head_dim,
        num_key_value_heads=text_hidden // head_dim, max_position_embeddings=32768,
        initializer_range=init_std, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        config = Config(
            text_config={**text, "rope_parameters": {
                "rope_type": "default", "rope_theta": rope_theta, "mrope_section": [16, 8, 8]}},
            vision_config=dict(depth=num_layers, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                               num_heads=4, out_hidden_size=text_hidden, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[num_layers - 1],
                               initializer_range=init_std),
            **ids)
    elif family == "qwen3_5":
        from transformers import Qwen3_5Config as Config, Qwen3_5ForConditionalGeneration as Model

        config = Config(
            text_config={**text, "head_dim": head_dim, "layer_types": ["linear_attention", "full_attention"] * 2,
                         "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                         # vLLM's CPU Gated DeltaNet kernels take head dimension 64 only.
                         "linear_key_head_dim": head_dim, "linear_value_head_dim": head_dim,
                         "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                             "mrope_section": [16, 8, 8], "mrope_interleaved": True,
                                             "partial_rotary_factor": 1.0}},
            vision_config=dict(depth=num_layers, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                               num_heads=4, out_hidden_size=text_hidden, patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=256, initializer_range=init_std),
            **ids)
    else:
        from transformers import Qwen3VLConfig as Config, Qwen3VLForConditionalGeneration as Model

        config = Config(
            text_config={**text, "head_dim": head_dim, "rope_parameters": {
                "rope_type": "default", "rope_theta": rope_theta, "mrope_section": [16, 8, 8],
                "mrope_interleaved": True}},
            vision_config=dict(depth=num_layers, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                               num_heads=4, out_hidden_size=text_hidden, patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=256,
                               deepstack_visual_indexes=[0], initializer_range=init_std),
            **ids)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = Model(config).eval()
    processor = qwen_processor(tokenizer, "qwen2_5_vl" if family == "qwen2_5_vl" else "qwen3_vl")
    _save(model, tokenizer, processor, out, {"random_weights": True, "seed": seed, "family": family,
                                              "rope_theta": rope_theta, "init_std": init_std})
    return out


def qwen_processor(tokenizer, family: str, pixels: int | None = None):
    """The family's own processor: images resized to multiples of 2 patches, any size
    between Qwen's default minimum and maximum pixel counts (or to about `pixels` pixels,
    the composite benchmark's fixed token grid, for video frames too)."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor, Qwen2VLImageProcessor as Images
        from transformers import Qwen2VLVideoProcessor as Videos
        patch = 14
    else:
        from transformers import Qwen3VLProcessor as Processor, Qwen2VLImageProcessor as Images
        from transformers import Qwen3VLVideoProcessor as Videos
        patch = 16
    sizes = ({"shortest_edge": pixels, "longest_edge": pixels} if pixels else
             {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384})
    return Processor(
        image_processor=Images(patch_size=patch, merge_size=2, temporal_patch_size=2, size=sizes),
        video_processor=Videos(patch_size=patch, merge_size=2, temporal_patch_size=2,
                               **({"size": sizes} if pixels else {})),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
