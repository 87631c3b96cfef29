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


QWEN_VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
# Frames per second a clip is sent at: Qwen places a frame pair's tokens in time by it, so
# training and serving must agree.
VIDEO_FPS = 2.0


def hf_video_metadata(metadata: dict) -> dict:
    """A clip's metadata as vLLM takes it (VideoComposite.clip) made what transformers'
    processors take: without vLLM's own keys."""
    return {k: v for k, v in metadata.items() if k not in ("do_sample_frames", "video_backend")}


# Where a tile sits, by its row and column of a 3 x 3 grid.
PLACES = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
MOMENTS = ("start", "end")
VIDEO_QUESTIONS = {"color": "what color is the shape in the {place} tile at the {moment}?",
                   "shape": "what shape is in the {place} tile at the {moment}?"}
# The image task's questions plus a moment: the tile is named by the attribute not asked.
VIDEO_ATTRIBUTE_QUESTIONS = {"color": "what color is the {shape} at the {moment}?",
                             "shape": "what shape is {color} at the {moment}?"}
NAMINGS = ("attribute", "place")


@dataclass(frozen=True)
class VideoComposite:
    """The video version: a 3 x 3 composite whose tiles change over `len(scenes)` scenes
    (each a tuple of tiles in raster order, shown for `frames_per_scene` frames). The
    question names a tile (by its other attribute or its place) and a moment, the first
    scene or the last, and the queried tile differs between the two in the attribute asked:
    answering needs both the right tile and the right time."""

    scenes: tuple[tuple[Tile, ...], ...]
    grid: int
    target: int  # tile index, raster order
    moment: str  # "start" or "end"
    asks: str
    question: str
    answer: str
    frames_per_scene: int = 2
    fps: float = VIDEO_FPS  # what the clip says it was sampled at: Qwen times frame pairs by it
    naming: str = "attribute"  # how its questions name a tile (NAMINGS)

    @property
    def scene(self) -> int:
        return 0 if self.moment == "start" else len(self.scenes) - 1

    def still(self, scene: int) -> Composite:
        """One scene as a still composite (its image; its patch_mask is the queried tile's)."""
        return Composite(self.scenes[scene], self.grid, self.target, "", "", "")

    def frames(self) -> list:
        """The clip's frames (PIL images), each scene repeated frames_per_scene times: Qwen's
        ViT merges two frames into one temporal patch, so a scene never straddles one."""
        images = [self.still(i).image() for i in range(len(self.scenes))]
        return [image for image in images for _ in range(self.frames_per_scene)]

    def clip(self) -> tuple[np.ndarray, dict]:
        """The frames as vLLM takes a video (frames x H x W x 3), with the metadata Qwen's
        processors read (`fps`, every frame used as sent)."""
        frames = np.stack([np.asarray(frame) for frame in self.frames()])
        return frames, {"fps": self.fps, "duration": len(frames) / self.fps, "total_num_frames": len(frames),
                        "frames_indices": list(range(len(frames))), "video_backend": "opencv",
                        "do_sample_frames": False}

    def token_mask(self, temporal_steps: int, side: int) -> np.ndarray:
        """Boolean (temporal_steps * side**2,) in Qwen's video order (time, then raster):
        the queried tile's tokens in the frames of the queried scene."""
        tile = self.still(0).patch_mask(side)
        frames = len(self.scenes) * self.frames_per_scene
        step_scene = np.arange(temporal_steps) * frames // temporal_steps // self.frames_per_scene
        return ((step_scene == self.scene)[:, None] & tile[None, :]).reshape(-1)


def make_video_composites(split: str, count: int, *, scenes: int = 3, changes: int = 3,
                          frames_per_scene: int = 2, seed: int = 0,
                          naming: str = "attribute") -> list[VideoComposite]:
    """`count` 3 x 3 clips of `scenes` scenes, each scene replacing `changes` tiles of the
    one before (the queried tile always among them); questions alternate colour and shape
    and the start and the end, deterministic in seed.

    `naming` is how a question names its tile: "attribute", as the image task does ("what
    color is the triangle at the end?": in every scene the queried place holds the one
    triangle, a different one each time), or "place" ("what color is the shape in the
    top-left tile at the end?"). Either way the other moment's tile answers differently."""
    if scenes < 2 or not 1 <= changes <= 9:
        raise ValueError(f"scenes must be at least 2 and changes 1-9, got {scenes} and {changes}")
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    pool = tiles(split)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        asks = "color" if i % 2 == 0 else "shape"
        moment = MOMENTS[(i // 2) % 2]
        target = rng.randrange(9)
        first = list(rng.sample(pool, 9))
        if naming == "attribute":
            names = "shape" if asks == "color" else "color"
            value = getattr(first[target], names)
            # The queried place holds the only tile with the naming attribute, in every scene.
            named = [t for t in pool if getattr(t, names) == value]
            unnamed = [t for t in pool if getattr(t, names) != value]
            first = [t if p == target else rng.choice(unnamed) for p, t in enumerate(first)]
        else:
            named = unnamed = pool
        clip = [tuple(first)]
        for _ in range(scenes - 1):
            scene = list(clip[-1])
            for place in [target] + rng.sample([p for p in range(9) if p != target], changes - 1):
                scene[place] = rng.choice(named if place == target else unnamed)
            clip.append(tuple(scene))
        # The other moment's tile must answer differently, so the moment matters.
        other = 0 if moment == "end" else len(clip) - 1
        asked = clip[0 if moment == "start" else -1]
        while getattr(clip[other][target], asks) == getattr(asked[target], asks):
            scene = list(clip[other])
            scene[target] = rng.choice(named)
            clip[other] = tuple(scene)
        answer = getattr(asked[target], asks)
        if naming == "attribute":
            question = VIDEO_ATTRIBUTE_QUESTIONS[asks].format(moment=moment, **{names: value})
        else:
            question = VIDEO_QUESTIONS[asks].format(place=PLACES[target], moment=moment)
        out.append(VideoComposite(tuple(clip), 3, target, moment, asks, question, answer, frames_per_scene,
                                  naming=naming))
    return out


def other_video_questions(clip: VideoComposite, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs about a clip besides its own, named as its own is: first
    the same tile and attribute at the other moment (which answers differently, so the
    pair differs only in time), then every other tile at either moment that its place, or
    an attribute no other tile of that scene shares, names."""
    other = "end" if clip.moment == "start" else "start"
    scene_of = {"start": clip.scenes[0], "end": clip.scenes[-1]}
    out = [_video_question(clip.naming, scene_of[other], clip.target, clip.asks, other)]
    for moment in MOMENTS:
        scene = scene_of[moment]
        for i in range(len(scene)):
            if i == clip.target:
                continue
            if clip.naming == "place":
                out.append(_video_question("place", scene, i, rng.choice(("color", "shape")), moment))
                continue
            if [t.color for t in scene].count(scene[i].color) == 1:
                out.append(_video_question("attribute", scene, i, "shape", moment))
            if [t.shape for t in scene].count(scene[i].shape) == 1:
                out.append(_video_question("attribute", scene, i, "color", moment))
    return out


def _video_question(naming: str, scene, index: int, asks: str, moment: str) -> tuple[str, str]:
    tile = scene[index]
    if naming == "place":
        return VIDEO_QUESTIONS[asks].format(place=PLACES[index], moment=moment), getattr(tile, asks)
    return VIDEO_ATTRIBUTE_QUESTIONS[asks].format(shape=tile.shape, color=tile.color, moment=moment), getattr(tile, asks)
