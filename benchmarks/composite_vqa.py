"""A VQA task where the prompt decides which part of the image matters.

Real third-party data: the easy-VQA images (64x64, one coloured shape each, MIT licence,
`pip install easy-vqa`). A composite tiles grid x grid of them into one image and asks
about exactly one tile, named through the attribute it does not ask for:
"what color is the triangle?" where only one tile holds a triangle, or
"what shape is the teal one?" where only one tile is teal. The answer is that tile's
label, and `patch_mask` says which vision patches cover it (ground truth for recall).
Test composites use only easy-VQA test images, training composites only train images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
SHAPES = ("circle", "rectangle", "triangle")
TILE_PX = 64
COLOR_QUESTIONS = ("what color is the {shape}?", "what is the color of the {shape}?")
SHAPE_QUESTIONS = ("what shape is {color}?", "what is the {color} shape?")


@dataclass(frozen=True)
class Tile:
    path: str
    color: str
    shape: str


@dataclass(frozen=True)
class Composite:
    tiles: tuple[Tile, ...]  # raster order
    grid: int
    target: int  # index into tiles
    asks: str  # "color" or "shape"
    question: str
    answer: str

    def image(self):
        from PIL import Image

        canvas = Image.new("RGB", (self.grid * TILE_PX, self.grid * TILE_PX))
        for i, tile in enumerate(self.tiles):
            with Image.open(tile.path) as im:
                canvas.paste(im.convert("RGB"), ((i % self.grid) * TILE_PX, (i // self.grid) * TILE_PX))
        return canvas

    def shape_pixels(self) -> np.ndarray:
        """Boolean (H, W): pixels of the shapes (they differ from their tile's background,
        which is one flat colour, read at the tile's corner)."""
        pixels = np.asarray(self.image(), dtype=np.int16)
        side = self.grid * TILE_PX
        out = np.zeros((side, side), dtype=bool)
        for r in range(self.grid):
            for c in range(self.grid):
                tile = pixels[r * TILE_PX:(r + 1) * TILE_PX, c * TILE_PX:(c + 1) * TILE_PX]
                out[r * TILE_PX:(r + 1) * TILE_PX, c * TILE_PX:(c + 1) * TILE_PX] = (
                    np.abs(tile - tile[0, 0]).max(-1) > 48)
        return out

    def patch_labels(self, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
        """Per patch (raster order): index into COLORS / SHAPES of the shape the patch
        shows, or len(COLORS) / len(SHAPES) where it shows background only. Local
        labels, as a vision tower would learn from pixels around it."""
        covered = self.shape_pixels()
        n = covered.shape[0] // patch_px
        share = covered[:n * patch_px, :n * patch_px].reshape(n, patch_px, n, patch_px).mean((1, 3))
        cell = (np.arange(n) * patch_px + patch_px // 2) // TILE_PX
        owner = (cell[:, None] * self.grid + cell[None, :])
        on_shape = share > 0.1
        color = np.where(on_shape, np.vectorize(lambda i: COLORS.index(self.tiles[i].color))(owner), len(COLORS))
        shape = np.where(on_shape, np.vectorize(lambda i: SHAPES.index(self.tiles[i].shape))(owner), len(SHAPES))
        return color.reshape(-1), shape.reshape(-1)

    def patch_mask(self, patches_per_side: int) -> np.ndarray:
        """Boolean (patches_per_side**2,) in raster order: patches whose centre lies in the
        queried tile."""
        centres = (np.arange(patches_per_side) + 0.5) * self.grid / patches_per_side
        cell = np.floor(centres).astype(int)
        rows, cols = np.meshgrid(cell, cell, indexing="ij")
        return ((rows * self.grid + cols) == self.target).reshape(-1)


@lru_cache(maxsize=2)
def tiles(split: str) -> tuple[Tile, ...]:
    """Every easy-VQA image of a split with its colour and shape, read from the
    dataset's own answers (each image has a colour question and a shape question)."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    labels: dict[int, dict[str, set[str]]] = {}
    for answer, image_id in zip(answers, image_ids):
        slot = labels.setdefault(image_id, {"color": set(), "shape": set()})
        if answer in COLORS:
            slot["color"].add(answer)
        elif answer in SHAPES:
            slot["shape"].add(answer)
    out = []
    for image_id in sorted(paths):
        found = labels.get(image_id)
        if found and len(found["color"]) == 1 and len(found["shape"]) == 1:
            out.append(Tile(paths[image_id], *found["color"], *found["shape"]))
    return tuple(out)


def make_composites(split: str, count: int, *, grid: int = 3, seed: int = 0) -> list[Composite]:
    """`count` composites, half asking a colour and half a shape, deterministic in seed."""
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    pool = tiles(split)
    by_shape = {s: [t for t in pool if t.shape == s] for s in SHAPES}
    by_color = {c: [t for t in pool if t.color == c] for c in COLORS}
    rng = random.Random(seed)
    out = []
    for i in range(count):
        asks = "color" if i % 2 == 0 else "shape"
        target_tile = rng.choice(pool)
        if asks == "color":
            # The shape names the tile, so no other tile may have it.
            others = [t for s, ts in by_shape.items() if s != target_tile.shape for t in ts]
            question = rng.choice(COLOR_QUESTIONS).format(shape=target_tile.shape)
            answer = target_tile.color
        else:
            others = [t for c, ts in by_color.items() if c != target_tile.color for t in ts]
            question = rng.choice(SHAPE_QUESTIONS).format(color=target_tile.color)
            answer = target_tile.shape
        chosen = rng.sample(others, grid * grid - 1)
        target = rng.randrange(grid * grid)
        chosen.insert(target, target_tile)
        out.append(Composite(tuple(chosen), grid, target, asks, question, answer))
    return out


def other_questions(composite: Composite, rng: random.Random) -> list[tuple[int, str, str]]:
    """(tile index, question, answer) about every other tile that an attribute no other
    tile shares names (so its answer is defined), in raster order, the colour-named
    question first where a tile has both."""
    colors = [t.color for t in composite.tiles]
    shapes = [t.shape for t in composite.tiles]
    out = []
    for i, tile in enumerate(composite.tiles):
        if i == composite.target:
            continue
        if colors.count(tile.color) == 1:
            out.append((i, rng.choice(SHAPE_QUESTIONS).format(color=tile.color), tile.shape))
        if shapes.count(tile.shape) == 1:
            out.append((i, rng.choice(COLOR_QUESTIONS).format(shape=tile.shape), tile.color))
    return out


# Qwen-VL's image placeholder, as its chat template writes an image content part.
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_prompt(tokenizer, question: str, placeholder: str | None = None) -> str:
    """The prompt a chat request for this question becomes: vLLM puts the image
    placeholder (LLaVA's "<image>\n" unless given) before the text."""
    from par_vllm.demo_model import IMAGE_TOKEN

    messages = [{"role": "user", "content": (placeholder or f"{IMAGE_TOKEN}\n") + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
