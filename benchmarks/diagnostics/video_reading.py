"""Does a Qwen model train_vqa saved read a video at all, or only an image?

For the video accuracy benchmark's model: where its answers fail, this tells a model that
cannot read video tokens from one that reads them but cannot tell the start of a clip from
its end. Teacher-forced exact-match accuracy (train_vqa's own measure) on held-out
composites from the train split, in the language model as trained (transformers, float32):

  image                       the image task itself (a tile named by its other attribute)
  still clip, P frame pairs   the same composite and question sent as a video whose every
                              frame is that image: nothing to choose in time, only the
                              video path (the tower's two-frame patches, the frames' own
                              temporal M-RoPE positions) differs from the image's
  still clip, P pairs, t step 1
                              the longest still clip again, sent at the frame rate that
                              puts its frame pairs one temporal position apart (Qwen2.5-VL
                              spaces them tokens_per_second x seconds per pair): as many
                              tokens, but its last time is P - 1, which at the benchmark's
                              9 pairs of 12 x 12 tokens stays under the image's height and
                              width positions, so the text after it starts where it does
                              after the image
  video task                  the video benchmark's questions (a tile named by its other
                              attribute, or with --naming place by its place, and a
                              moment) on its clips
  video task, one scene       the same questions with every scene the one asked about

    python -m benchmarks.diagnostics.video_reading --model .models/vqa-qwen-video

Writes benchmarks/results/video-reading-<model>.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from benchmarks.common import model_about, model_words
from benchmarks.composite_vqa import (
    NAMINGS,
    VIDEO_FPS,
    VideoComposite,
    make_composites,
    make_video_composites,
)
from benchmarks.train_vqa import FAMILIES, answer_loss, encode, load_saved

RESULTS = Path(__file__).parents[1] / "results"


def accuracy(model, processor, arch, items, batch: int = 4) -> float:
    right = 0.0
    with torch.no_grad():
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            enc, targets = encode(processor, [(c, [(c.question, c.answer)]) for c in chunk], arch)
            right += answer_loss(model, enc, targets)[1] * len(chunk)
    return right / len(items)


def still_clip(composite, frame_pairs: int, fps: float = VIDEO_FPS) -> VideoComposite:
    """An image composite as a clip of 2 x frame_pairs identical frames, asked the same."""
    return VideoComposite((composite.tiles,), composite.grid, composite.target, "start", composite.asks,
                          composite.question, composite.answer, 2 * frame_pairs, fps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=32, help="held-out composites and clips")
    parser.add_argument("--frame-pairs", type=int, nargs="+", default=[1, 3, 9])
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--frames-per-scene", type=int, default=6)
    parser.add_argument("--naming", choices=NAMINGS, default="attribute",
                        help="how the video task's questions name their tile (make_video_composites)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    about = model_about(args.model)
    if about.get("family") != "qwen2_5_vl":
        parser.error(f"{args.model} is not a Qwen2.5-VL model train_vqa saved: videos are Qwen's")
    model, tokenizer, _, _ = load_saved(args.model.resolve())
    arch = FAMILIES["qwen2_5_vl"](about["training"]["grid"], about["training"]["patch"])
    processor = arch.processor(tokenizer)
    processor.tokenizer.padding_side = "left"
    model.eval()

    # train_vqa's held-out seeds: the test split stays the benchmarks'.
    images = make_composites("train", args.count, grid=arch.grid, seed=20_000)
    clips = make_video_composites("train", args.count, scenes=args.scenes, frames_per_scene=args.frames_per_scene,
                                  seed=10_000, naming=args.naming)
    rows = [("image", accuracy(model, processor, arch, images))]
    for pairs in args.frame_pairs:
        rows.append((f"still clip, {pairs} frame pairs",
                     accuracy(model, processor, arch, [still_clip(c, pairs) for c in images])))
        print(*rows[-1], flush=True)
    vision = model.config.vision_config
    pairs = max(args.frame_pairs)
    unit_fps = vision.temporal_patch_size * vision.tokens_per_second
    rows.append((f"still clip, {pairs} pairs, t step 1",
                 accuracy(model, processor, arch, [still_clip(c, pairs, unit_fps) for c in images])))
    pairs = args.scenes * args.frames_per_scene // 2
    rows.append((f"video task ({pairs} frame pairs)", accuracy(model, processor, arch, clips)))
    one_scene = [dataclasses.replace(c, scenes=(c.scenes[c.scene],) * len(c.scenes)) for c in clips]
    rows.append(("video task, one scene", accuracy(model, processor, arch, one_scene)))

    header = (f"Teacher-forced exact-match accuracy, {args.count} held-out composites / clips each (train split, "
              f"train_vqa's validation seeds); model: {model_words(about, args.model)}; "
              "transformers, float32, CPU")
    text = "\n".join([
        header,
        "",
        *(f"{name:<36}{value:>7.3f}" for name, value in rows),
    ]) + "\n"
    print(text)
    path = args.out / f"video-reading-{args.model.name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
