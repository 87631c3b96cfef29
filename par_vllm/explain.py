"""Show which patches PAR keeps for an image and a prompt, and which it merges into which.

Runs the checkpoint's own vision tower, projector and word-embedding table (transformers,
float32, the same functions vLLM runs) and the reduction of `par_vllm.reduction`, then
draws the patch grid over the image: each kept patch outlined (thick where retrieval kept
it for the prompt), each merged patch tinted with the colour of the kept patch it joined,
dropped patches (pruning baselines) greyed out.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .settings import ParSettings
from .prompt import QueryRewriter
from .dispatch import reduce_tokens
from .reduction import Reduction


class Explainer:
    def __init__(self, model_dir: str | Path):
        from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.rewriter = QueryRewriter(self.tokenizer, self.processor.image_token)
        self.config = self.model.config

    @torch.no_grad()
    def visual_tokens(self, image: Image.Image) -> torch.Tensor:
        """1 x N x D: the projected visual tokens the language model would see."""
        pixels = self.processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        return features

    @torch.no_grad()
    def query(self, prompt: str, drop_question_type: bool = True) -> torch.Tensor:
        """1 x T x D: the prompt's content words in the LLM's input embedding space."""
        ids = self.rewriter(self.tokenizer.encode(f"{self.processor.image_token}\n{prompt}"), drop_question_type)
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))[None]

    def reduce(self, image: Image.Image, prompt: str, settings: ParSettings) -> Reduction:
        visual = self.visual_tokens(image)
        query = self.query(prompt, settings.drop_question_type_words)
        mask = torch.ones(1, query.shape[1], dtype=torch.bool)
        return reduce_tokens(visual, query, mask, settings.num_kept(visual.shape[1]), settings)


def render(image: Image.Image, reduction: Reduction, size: int = 672) -> Image.Image:
    """The image with PAR's decisions drawn on its patch grid (first image of the batch)."""
    kept = reduction.kept_indices[0].tolist()
    assignment = reduction.assignment[0].tolist()
    retrieved = set(reduction.retrieved[0].nonzero().flatten().tolist())
    side = math.isqrt(len(assignment))
    cell = size / side
    base = image.convert("RGB").resize((size, size))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    golden = 0.618033988749895
    colours = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((k * golden) % 1.0, 0.85, 1.0))
               for k in range(len(kept))]
    for token, group in enumerate(assignment):
        r, c = divmod(token, side)
        box = [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]
        if group < 0:
            draw.rectangle(box, fill=(40, 40, 40, 170))
        elif token not in kept:
            draw.rectangle(box, fill=(*colours[group], 90))
    for slot, token in enumerate(kept):
        r, c = divmod(token, side)
        box = [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]
        draw.rectangle(box, outline=(*colours[slot], 255), width=4 if token in retrieved else 2)
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def explain(model_dir, image_path, prompt: str, out: str | Path, settings: ParSettings) -> Path:
    image = Image.open(image_path)
    reduction = Explainer(model_dir).reduce(image, prompt, settings)
    render(image, reduction).save(out)
    return Path(out)
