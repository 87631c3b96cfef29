"""How much of a video repeats itself? The share of a clip's visual tokens that are near
copies of the token at their place in the frame pair before.

PAR compares every token of a clip with every other (clustering and routing), so its
selection costs grow with N x N. EVS compares each token only with the one at its place in
the previous frame pair. If most tokens are such repeats, PAR could merge them into their
first occurrence before its pairwise steps and compare only the distinct ones. This
measures how many would be left: a token at (t, h, w), t > 0, counts as a repeat where its
similarity to (t - 1, h, w), in PAR's token space (cosine after subtracting the clip's
mean token, reduction.token_space "centred"), is above a threshold (0.9 is PAR's
`duplicate_threshold`). Transformers, float32, on the clips of:

  serve       benchmarks/serve_video.py's clips (a still random scene, a square crossing it)
  composite   benchmarks/accuracy_video.py's clips (3 x 3 composites whose tiles change
              between scenes; test split)

    python -m benchmarks.diagnostics.temporal_repeats --model .models/smollm-qwen --clips serve
    python -m benchmarks.diagnostics.temporal_repeats --model .models/vqa-qwen-video --clips composite

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from par_vllm.reduction import token_space
from par_vllm.repeats import similarity_to_before

THRESHOLDS = (0.9, 0.95, 0.99)


def video_features(model, processor, frames, metadata) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The clip's visual tokens (N x D) as the language model sees them, and their grid
    (frame pairs, rows, columns) after the spatial merge."""
    inputs = processor.video_processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                                       return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                  video_grid_thw=inputs["video_grid_thw"])
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features))
    steps, height, width = inputs["video_grid_thw"][0].tolist()
    merge = processor.video_processor.merge_size
    return features, (steps, height // merge, width // merge)


def repeats(features: torch.Tensor, grid: tuple[int, int, int], threshold: float) -> int:
    """How many tokens are near copies of the token at their place one frame pair before."""
    units = token_space(features[None], None, "centred")[0]
    return int((similarity_to_before(units, grid[0]) > threshold).sum())


def clips(kind: str, count: int, seed: int):
    """(frames, metadata) per clip, as the benchmark of that kind sends them."""
    if kind == "serve":
        from benchmarks.serve_video import clip_frames, clip_metadata

        return [(clip_frames(i, 32, 336), clip_metadata(32)) for i in range(count)]
    from benchmarks.composite_vqa import hf_video_metadata, make_video_composites

    out = []
    for clip in make_video_composites("test", count, frames_per_scene=6, seed=seed):
        frames, metadata = clip.clip()
        out.append((frames, hf_video_metadata(metadata)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--clips", choices=("serve", "composite"), default="serve")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    print(f"{args.clips} clips, model {args.model}: tokens left after merging repeats (of N)")
    print(f"{'clip':>4} {'grid':>12} {'N':>6} " + " ".join(f"{'> ' + str(t):>8}" for t in THRESHOLDS))
    for i, (frames, metadata) in enumerate(clips(args.clips, args.count, args.seed)):
        features, grid = video_features(model, processor, frames, metadata)
        left = [features.shape[0] - repeats(features, grid, t) for t in THRESHOLDS]
        print(f"{i:>4} {'x'.join(map(str, grid)):>12} {features.shape[0]:>6} " + " ".join(f"{n:>8}" for n in left))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
