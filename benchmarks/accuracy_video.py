"""Video accuracy of PAR, vLLM's own EVS, uniform frame dropping and random at the same
budget, served by the real vLLM engine.

    .venv/bin/python -m benchmarks.accuracy_video --model .models/vqa-qwen-video

The model answers questions about clips of composite easy-VQA images whose tiles change
from scene to scene (composite_vqa.make_video_composites): "what color is the triangle at
the end?" (or with `--naming place`, "what shape is in the top-left tile at the end?"), so
an answer needs the right tile at the right moment. Every method
runs inside the plugin (`par_method` per request, the video's K = ceil(N x budget)), so
the language model, the prompt and the clip are the same and only the kept tokens differ.
EVS keeps a video's first frame whole, so it cannot run at a budget below one frame's
tokens: such a row says so instead of an accuracy.

Per method and budget: accuracy, accuracy as % of the full-token model, accuracy on the
questions about the start and about the end, and prefill tokens per request (vLLM's own
prompt token count). Writes accuracy-video-<name>.{txt,json} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.common import (
    LABELS,
    add_variant_argument,
    answer_each,
    correct_strings,
    model_about,
    model_words,
    right_answers,
    write_results,
)
from benchmarks.composite_vqa import (
    NAMINGS,
    QWEN_VIDEO_PLACEHOLDER,
    TILE_PX,
    chat_prompt,
    hf_video_metadata,
    make_video_composites,
)
from par_vllm import PLACES_ROWS, WORKER_CLS, par_architecture
from par_vllm.server import CPU_ENV, par_overrides
from par_vllm.settings import ParSettings

METHODS = ("par", "evs", "frames", "random")
BUDGETS = (0.25, 0.111, 0.06)


def clip_tokens(processor, clip) -> tuple[int, int]:
    """(N, tokens per temporal step) of a clip, from the model's own processor."""
    frames, meta = clip
    out = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt",
                                    video_metadata=[hf_video_metadata(meta)])
    steps, height, width = out["video_grid_thw"][0].tolist()
    merge = processor.video_processor.merge_size
    return steps * height * width // merge**2, height * width // merge**2


def configs_for(methods, budgets, num_visual: int, per_step: int, variants=()) -> list[tuple[str, dict | None]]:
    """(name, mm_processor_kwargs) per row; None where the method cannot keep that few."""
    configs = [("full", {"par_enabled": False})]
    for budget in budgets:
        for method in methods:
            kwargs = {"par_method": method, "par_keep_ratio": budget}
            feasible = method != "evs" or ParSettings.from_keys(kwargs).num_kept(num_visual) >= per_step
            configs.append((f"{method}@{budget:g}", kwargs if feasible else None))
        for name, keys in variants:
            configs.append((f"{name}@{budget:g}", {"par_method": "par", **keys, "par_keep_ratio": budget}))
    return configs


def run_vllm(model: Path, clips, configs, max_num_seqs: int, max_model_len: int, max_pixels: int):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model)
    architecture = par_architecture(json.loads((model / "config.json").read_text())["architectures"])
    if architecture not in PLACES_ROWS:
        raise SystemExit(f"{model} is a {architecture}: the video benchmark needs a Qwen-VL model")
    llm = LLM(str(model), hf_overrides=par_overrides(architecture=architecture), enforce_eager=True,
              mm_processor_kwargs={"max_pixels": max_pixels},
              dtype="float32", max_model_len=max_model_len, max_num_seqs=max_num_seqs,
              limit_mm_per_prompt={"video": 1, "image": 0}, seed=0, worker_cls=WORKER_CLS)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    prompts = [chat_prompt(tokenizer, c.question, QWEN_VIDEO_PLACEHOLDER) for c in clips]
    videos = [c.clip() for c in clips]
    return answer_each(llm, params, prompts, "video", videos, configs)


def summarize(clips, configs, answers, right, num_visual: int) -> list[dict]:
    rows, full_accuracy = [], None
    for name, kwargs in configs:
        method, _, budget = name.partition("@")
        row = {"method": method, "budget": float(budget) if budget else 1.0}
        if kwargs is None:
            rows.append({**row, "visual_tokens": ParSettings(keep_ratio=row["budget"]).num_kept(num_visual),
                         "accuracy": None})
            continue
        correct = right[name]
        accuracy = sum(correct) / len(correct)
        full_accuracy = accuracy if name == "full" else full_accuracy
        settings = ParSettings.from_keys(kwargs)
        rows.append({
            **row,
            "visual_tokens": num_visual if settings.reduces_nothing else settings.num_kept(num_visual),
            "accuracy": accuracy,
            "pct_of_full": 100 * accuracy / full_accuracy if full_accuracy else float("nan"),
            **{f"{moment}_accuracy": _share(correct, clips, moment) for moment in ("start", "end")},
            "prefill_tokens": sum(answers[name]["prefill_tokens"]) / len(clips),
            "vllm_seconds": round(answers[name]["seconds"], 1),
        })
    return rows


def _share(correct, clips, moment):
    picked = [ok for ok, c in zip(correct, clips) if c.moment == moment]
    return sum(picked) / len(picked) if picked else float("nan")


def table(rows, per_step: int) -> str:
    header = f"{'method':<28}{'budget':>7}{'tokens':>7}{'accuracy':>9}{'% full':>8}{'start':>7}{'end':>7}{'prefill':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        label = f"{LABELS.get(r['method'], r['method']):<28}{r['budget']:>7.1%}{r['visual_tokens']:>7}"
        if r["accuracy"] is None:
            lines.append(f"{label}   n/a: EVS keeps the first frame whole ({per_step} tokens)")
            continue
        lines.append(f"{label}{r['accuracy']:>9.3f}{r['pct_of_full']:>7.1f}%{r['start_accuracy']:>7.3f}"
                     f"{r['end_accuracy']:>7.3f}{r['prefill_tokens']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path(".models/vqa-qwen-video"))
    parser.add_argument("--count", type=int, default=200, help="test clips")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    add_variant_argument(parser, "a PAR variant measured beside the methods", "unmerged:merge_repeats=false")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--naming", choices=NAMINGS, default="attribute",
                        help="how a question names its tile (make_video_composites)")
    parser.add_argument("--frames-per-scene", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--name", default="vqa-qwen")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)

    clips = make_video_composites("test", args.count, scenes=args.scenes, frames_per_scene=args.frames_per_scene,
                                  seed=args.seed, naming=args.naming)
    model = args.model.resolve()  # Hugging Face reads a relative path as a hub id
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    num_visual, per_step = clip_tokens(processor, clips[0].clip())
    configs = configs_for(args.methods, args.budgets, num_visual, per_step, args.variant)
    # vLLM admits a video of at most 14 frames at the processor's largest frame size, and
    # within the context length. This model resizes every frame to one size (its smallest
    # and largest are equal), so the benchmark's longer clips would be refused; a larger
    # largest size admits them and, the smallest unchanged, leaves every frame as before.
    answers = run_vllm(model, clips, configs, args.max_num_seqs, max_model_len=max(4096, 2 * num_visual),
                       max_pixels=4 * processor.video_processor.size["longest_edge"])
    right = right_answers(answers, clips)
    rows = summarize(clips, configs, answers, right, num_visual)

    about = model_about(args.model)
    frames = args.scenes * args.frames_per_scene
    title = (f"composite easy-VQA clips (3x3 tiles of {TILE_PX} px, {args.scenes} scenes x {args.frames_per_scene} "
             f"frames = {frames} frames, {num_visual} visual tokens, {per_step} per frame pair), "
             f"{len(clips)} test questions; model: {model_words(about, args.model)}")
    text = f"{title}\nvision: {about.get('vision_tower_and_projector', 'see par_model.json')}\n\n{table(rows, per_step)}\n"
    print(text)
    stem = args.out / f"accuracy-video-{args.name}"
    write_results(stem, text, {
        "model": str(args.model), "about": about, "count": len(clips), "seed": args.seed, "scenes": args.scenes,
        "frames_per_scene": args.frames_per_scene, "visual_tokens": num_visual, "tokens_per_step": per_step,
        "rows": rows, "split": "test", "correct": correct_strings(right),
    })
    print(f"wrote {stem}.txt/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
