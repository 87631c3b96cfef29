"""Show which patches PAR keeps for an image and a prompt, and which it merges into which.

Runs the checkpoint's own vision tower, projector and word-embedding table (transformers,
float32, the same functions vLLM runs) and the reduction of `par_vllm.reduction`, then
draws the patch grid over the image: each kept patch outlined (thick where retrieval kept
it for the prompt), each merged patch tinted with the colour of the kept patch it joined,
dropped patches (pruning baselines) greyed out. For LLaVA-NeXT (AnyRes) two panels: the
base view's grid over the whole image squashed to a square, as the base view sees it, and
the tiles' unpadded grid over the image at its own aspect; the row separators are not
visual tokens and are not drawn. For Qwen-VL one panel: the merged-token grid over the image
at its own aspect, as the processor resized it.
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


QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")


class Explainer:
    def __init__(self, model_dir: str | Path):
        from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                                  LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)

        model_type = AutoConfig.from_pretrained(model_dir).model_type
        self.anyres = model_type == "llava_next"
        self.qwen = model_type in QWEN_TYPES
        model_class = (AutoModelForImageTextToText if self.qwen else
                       LlavaNextForConditionalGeneration if self.anyres else LlavaForConditionalGeneration)
        self.model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.rewriter = QueryRewriter(self.tokenizer, self.processor.image_token)
        self.config = self.model.config

    def visual_tokens(self, image: Image.Image) -> torch.Tensor:
        """1 x N x D: the projected visual tokens the language model would see (separators
        excluded)."""
        return self.features(image)[0]

    @torch.no_grad()
    def features(self, image: Image.Image) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The visual tokens, and the (rows, columns) of each grid they lie on in raster
        order: the base view's, then for AnyRes the tiles' unpadded grid."""
        inputs = self.processor.image_processor(image.convert("RGB"), return_tensors="pt")
        if self.qwen:  # dynamic resolution: the merged grid of the image as the processor resized it
            _, height, width = inputs["image_grid_thw"][0].tolist()
            merge = self.config.vision_config.spatial_merge_size
            features = self.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                           image_grid_thw=inputs["image_grid_thw"]).pooler_output
            return features[0][None], [(height // merge, width // merge)]
        extra = {"image_sizes": inputs["image_sizes"]} if self.anyres else {}
        features = self.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            **extra,
        )
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        if not self.anyres:
            return features, [(side, side)]
        separators = (features[0] == self.model.model.image_newline).all(dim=-1)
        rows = int(separators.sum())
        visual = features[:, ~separators]
        return visual, [(side, side), (rows, (visual.shape[1] - side * side) // rows)]

    @torch.no_grad()
    def query(self, prompt: str, drop_question_type: bool = True) -> torch.Tensor:
        """1 x T x D: the prompt's content words in the LLM's input embedding space."""
        ids = self.rewriter(self.tokenizer.encode(f"{self.processor.image_token}\n{prompt}"), drop_question_type)
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))[None]

    def reduce(self, image: Image.Image, prompt: str, settings: ParSettings) -> Reduction:
        return self.reduce_visual(self.visual_tokens(image), prompt, settings)

    def reduce_visual(self, visual: torch.Tensor, prompt: str, settings: ParSettings,
                      grid: tuple[int, int] | None = None) -> Reduction:
        """`grid`: the tokens' (rows, columns) where they are one non-square grid (Qwen-VL),
        which pooling follows as the server's does."""
        query = self.query(prompt, settings.drop_question_type_words)
        mask = torch.ones(1, query.shape[1], dtype=torch.bool)
        return reduce_tokens(visual, query, mask, settings.num_kept(visual.shape[1]), settings, grid=grid)


def render(image: Image.Image, reduction: Reduction, grids: list[tuple[int, int]] | None = None,
           size: int = 672, own_aspect: bool = False) -> Image.Image:
    """The image with PAR's decisions drawn on its patch grids (first image of the batch),
    one panel per grid: LLaVA-1.5's one square grid; for AnyRes the base view's over the
    image squashed to a square, then the tiles' over the image at its own aspect;
    `own_aspect` draws the only grid over the image at its own aspect (Qwen-VL)."""
    kept = reduction.kept_indices[0].tolist()
    assignment = reduction.assignment[0].tolist()
    retrieved = set(reduction.retrieved[0].nonzero().flatten().tolist())
    if grids is None:
        side = math.isqrt(len(assignment))
        grids = [(side, side)]
    golden = 0.618033988749895
    colours = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((k * golden) % 1.0, 0.85, 1.0))
               for k in range(len(kept))]
    image = image.convert("RGB")
    scale = size / max(image.size)
    views = [image.resize((size, size)), image.resize((round(image.width * scale), round(image.height * scale)))]
    if own_aspect:
        views = views[1:]
    panels, first = [], 0
    for panel, (rows, cols) in zip(views, grids):
        cell_w, cell_h = panel.width / cols, panel.height / rows
        overlay = Image.new("RGBA", panel.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)

        def box(token):
            r, c = divmod(token - first, cols)
            return [c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1]

        tokens = range(first, first + rows * cols)
        for token in tokens:
            group = assignment[token]
            if group < 0:
                draw.rectangle(box(token), fill=(40, 40, 40, 170))
            elif token not in kept:
                draw.rectangle(box(token), fill=(*colours[group], 90))
        for slot, token in enumerate(kept):
            if token in tokens:
                draw.rectangle(box(token), outline=(*colours[slot], 255), width=4 if token in retrieved else 2)
        panels.append(Image.alpha_composite(panel.convert("RGBA"), overlay).convert("RGB"))
        first += rows * cols
    if len(panels) == 1:
        return panels[0]
    out = Image.new("RGB", (sum(p.width for p in panels) + 16 * (len(panels) - 1), max(p.height for p in panels)),
                    (255, 255, 255))
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + 16
    return out


def explain(model_dir, image_path, prompt: str, out: str | Path, settings: ParSettings) -> Path:
    image = Image.open(image_path)
    explainer = Explainer(model_dir)
    visual, grids = explainer.features(image)
    grid = grids[0] if explainer.qwen else None
    render(image, explainer.reduce_visual(visual, prompt, settings, grid), grids, own_aspect=explainer.qwen).save(out)
    return Path(out)
