"""Build a small random-weight LLaVA offline, in the layout `vllm serve` loads.

The vision side has LLaVA-1.5's geometry (336 px images, 14 px patches: 576 visual
tokens per image, CLS dropped) so token counts match the real model; everything else
is tiny so it runs on a CPU in seconds. The weights are random: answers are noise,
token counts and the serving path are real.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), content as a string:
# vLLM puts the image placeholder into the text for string-content templates.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_WORDS = """
what which who where when how why is are was were the a an of in on at to from with and or
not this that these those there here it its color colour shape size number count many much
red green blue yellow black white gray grey orange purple pink brown dark light bright
circle square triangle rectangle star line dot shape object thing animal person people man
woman child dog cat bird car bus tree house sky water road sign text word letter picture
image photo left right top bottom middle center corner above below next behind front big
small large tiny tall short long wide round flat one two three four five six seven eight
nine ten zero yes no user assistant system describe tell answer question please show see
look find does do can could would should has have had be been being
""".split()


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 12))) for _ in range(4000)]
    sentences += [f"USER: {IMAGE_TOKEN}\n{s}?\nASSISTANT: {s}." for s in sentences[:500]]
    sentences += ["".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)]
    return sentences


def train_bpe(special_tokens: list[str], vocab_size: int = 1024):
    """A byte-level BPE trained on the demo corpus, `special_tokens` first in its vocabulary:
    the tokenizer of every tiny demo model (each family wraps it with its own special tokens
    and chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_tokenizer(vocab_size: int = 1024):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIAL_TOKENS, vocab_size),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


def make_demo_model(
    out_dir: str | Path,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 64,
    text_hidden: int = 128,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-weight LLaVA to out_dir and return the path."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlavaConfig(
        vision_config=vision_config(image_size, patch_size, vision_hidden, num_layers),
        text_config=tiny_text_config(tokenizer, text_hidden, num_layers, max_positions=4096),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    save_llava(model, tokenizer, out, image_size, patch_size,
                {"random_weights": True, "seed": seed})
    return out


def tiny_text_config(tokenizer, hidden: int, layers: int, max_positions: int):
    """A tiny Llama language model over `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        # vLLM's CPU paged attention supports head_dim 64, not tiny ones.
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# LLaVA-NeXT's AnyRes grids (height, width): up to 2x2 tiles of 336 px, or 1x3.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def make_demo_next_model(
    out_dir: str | Path,
    *,
    vision_hidden: int = 64,
    text_hidden: int = 128,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-weight LLaVA-NeXT (AnyRes: a 336 px base view plus up to four 336 px
    tiles, 2,928 visual tokens for a 672x672 image) to out_dir and return the path."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlavaNextConfig(
        vision_config=vision_config(336, 14, vision_hidden, num_layers),
        text_config=tiny_text_config(tokenizer, text_hidden, num_layers, max_positions=8192),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    save_llava_next(model, tokenizer, out, {"random_weights": True, "seed": seed})
    return out


def save_llava_next(model, tokenizer, out: Path, about: dict, image_size: int = 672) -> None:
    """Save a LLaVA-NeXT in the layout vLLM loads, with its visual token count (separators
    excluded) for a square image of image_size in par_model.json, counted on the model's
    own output: rows other than its image_newline."""
    import torch
    from PIL import Image

    processor = next_processor(tokenizer)
    inputs = processor(images=Image.new("RGB", (image_size, image_size)), text=IMAGE_TOKEN, return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output[0]
    visual = int((features != model.model.image_newline).any(dim=-1).sum())
    _save(model, tokenizer, processor, out,
          {**about, "family": "llava_next", "image_size": image_size, "visual_tokens_per_image": visual})


def next_processor(tokenizer):
    """LLaVA-NeXT's preprocessing: CLIP normalisation, a 336 px base view and AnyRes tiles."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=NEXT_PINPOINTS, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=tokenizer.chat_template,
    )


def vision_config(image_size: int = 336, patch_size: int = 14, hidden: int = 64, layers: int = 2):
    """A small CLIP tower with LLaVA-1.5's geometry: (336 / 14)^2 = 576 visual tokens."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden,
        intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        projection_dim=hidden,
    )


def save_llava(model, tokenizer, out: Path, image_size: int, patch_size: int, about: dict) -> None:
    _save(model, tokenizer, llava_processor(tokenizer, image_size, patch_size), out,
          {**about, "visual_tokens_per_image": (image_size // patch_size) ** 2})


def _save(model, tokenizer, processor, out: Path, about: dict) -> None:
    """The checkpoint in the layout vLLM loads, and what it is in par_model.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _rename_vision_keys_for_vllm(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "par_model.json").write_text(json.dumps(about, indent=2))


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """LLaVA-1.5's preprocessing (CLIP normalisation, resize + centre crop) at image_size."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )


def _rename_vision_keys_for_vllm(model_dir: Path) -> None:
    """transformers 5 saves the CLIP tower without its `vision_model.` level; vLLM's
    CLIPVisionModel loads `vision_tower.vision_model.*`."""
    from safetensors.torch import load_file, save_file

    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        renamed = {}
        for name, tensor in tensors.items():
            head, sep, tail = name.partition("vision_tower.")
            if sep and not tail.startswith("vision_model."):
                name = f"{head}vision_tower.vision_model.{tail}"
            renamed[name] = tensor
        save_file(renamed, shard, metadata={"format": "pt"})
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            (k.replace("vision_tower.", "vision_tower.vision_model.", 1)
             if "vision_tower." in k and "vision_tower.vision_model." not in k else k): v
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2))
