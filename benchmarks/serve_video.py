"""Video requests: stock vLLM, EVS and PAR at the same budget, side by side in one run.

Two real vLLM servers on 127.0.0.1 serve one Qwen2.5-VL checkpoint (by default the
SmolLM2-based one of benchmarks/serve.py): stock vLLM, and the PAR architecture. EVS runs
through the PAR server as `par_method=evs`: vLLM's own EVS selection
(`vllm.multimodal.video_prune.evs`, unchanged) at the request's K, its kept tokens placed
by the plugin. vLLM's own `--video-pruning-rate` cannot be the EVS series on this machine:
on the CPU build its engine dies on the first multimodal request (the CPU runner never
strips the position columns EVS appends; ../shared/VLLM_MM_PRUNING.md).

Each request sends its own MP4 clip, a random still scene with a square moving across it
(frames that mostly repeat, as in real video), and the servers read the same number of
frames from every clip. Series alternate in a seeded shuffled order per repeat and level.
Per series: TTFT p50 and p95, latency, requests per second, prompt tokens per request,
peak KV-cache usage. `--without-stock` leaves stock vLLM out: EVS against PAR alone, so
that many more paired repeats fit in the time.

    python -m benchmarks.serve_video --model smollm-qwen --keep-ratio 0.111
Writes benchmarks/results/serve-video-<model or --name>.{txt,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.common import add_variant_argument
from benchmarks.serve import (
    RESULTS,
    add_run_arguments,
    describe_device,
    model_dir,
    one_request,
    run_batch,
    series_row,
    summarize,
    table_header,
    timed_median,
    write_report,
)
from par_vllm import par_architecture
from par_vllm.demo import video_data_url
from par_vllm.server import CPU_ENGINE_ARGS, VllmServer, par_engine_args, par_overrides
from par_vllm.settings import ParSettings

QUESTION = "Where does the square go?"


def clip_frames(index: int, frames: int, side: int) -> np.ndarray:
    """Request `index`'s clip: its own random scene, a white square crossing it."""
    rng = np.random.default_rng(index)
    scene = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    square = side // 6
    out = np.repeat(scene[None], frames, axis=0)
    for f in range(frames):
        x = (side - square) * f // max(frames - 1, 1)
        out[f, side // 2 - square // 2:side // 2 + square // 2, x:x + square] = 255
    return out


def video_part(frames: int, side: int):
    return lambda i: {"type": "video_url", "video_url": {"url": video_data_url(clip_frames(i, frames, side))}}


def clip_metadata(frames: int) -> dict:
    """What the servers' loader reports for a clip of `frames` frames, as transformers takes it."""
    return {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames, "frames_indices": list(range(frames))}


def video_grid(path: Path, frames: int, side: int) -> tuple[int, int, int]:
    """A clip's (frame pairs, patch rows, patch columns), from the checkpoint's own processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    grid = processor.video_processor(videos=[clip_frames(0, frames, side)], video_metadata=[clip_metadata(frames)],
                                     do_sample_frames=False, return_tensors="pt")["video_grid_thw"][0].tolist()
    return tuple(grid)


def server_args(frames: int, gpu: bool) -> list[str]:
    """Engine arguments both servers share: one video of `frames` frames per request, caches
    off (every request's clip is new anyway; no series gains from another's work)."""
    engine = ["--max-model-len", "4096", "--max-num-batched-tokens", "4096"]
    return [*([] if gpu else CPU_ENGINE_ARGS), *engine, "--no-enable-prefix-caching",
            "--mm-processor-cache-gb", "0", "--trust-request-mm-kwargs",
            "--limit-mm-per-prompt", '{"image": 0, "video": 1}',
            "--media-io-kwargs", json.dumps({"video": {"num_frames": frames}})]


def par_server(path: Path, keep_ratio: float, common: list[str], log_path: Path) -> VllmServer:
    """The PAR architecture's server, which also runs the EVS series (par_method=evs)."""
    architecture = par_architecture(json.loads((path / "config.json").read_text())["architectures"])
    return VllmServer(path, hf_overrides=par_overrides(architecture=architecture, keep_ratio=keep_ratio),
                      extra_args=[*common, *par_engine_args(architecture)], log_path=log_path)


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the budget and the clips: the same in this benchmark and its profile
    (benchmarks/diagnostics/serve_profile.py)."""
    parser.add_argument("--model", default="smollm-qwen", help="smollm-qwen, or a Qwen2.5-VL checkpoint directory")
    parser.add_argument("--keep-ratio", type=float, default=0.111, help="EVS's and PAR's budget, a share of N")
    parser.add_argument("--frames", type=int, default=32, help="frames the servers read from each clip")
    parser.add_argument("--side", type=int, default=336, help="clip frames' side in px")


def selection_seconds(path: Path, grid: tuple[int, int, int], kept: int, device: str, repeats: int = 30,
                      clip: tuple[np.ndarray, dict] | None = None, variants: tuple[tuple[str, dict], ...] = ()) -> dict:
    """Seconds the model executor spends choosing one clip's K tokens, timed directly with
    the functions the two series run: PAR's reduction (the question's tokens as its query)
    and vLLM's EVS selection, on the same random features of the checkpoint's hidden size:
    the part of the two series' difference that is the selection itself. With `clip`
    (frames, metadata), also PAR and each of `variants` ((name, par_ keys) pairs) on that
    clip's own visual tokens (the checkpoint's tower, in transformers), whose repeats random
    features lack."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from vllm.multimodal.video_prune.evs import compute_retention_mask

    from par_vllm.dispatch import reduce_per_image
    from par_vllm.models.qwen_vl import evs_pruning_rate

    config = AutoConfig.from_pretrained(path)
    hidden, merge = config.text_config.hidden_size, config.vision_config.spatial_merge_size
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(grid[0] * grid[1] * grid[2] // merge**2, hidden, generator=generator).to(device)
    embed = torch.nn.Embedding(config.text_config.vocab_size, hidden).to(device)
    query_ids = torch.tensor(AutoTokenizer.from_pretrained(path).encode(QUESTION), device=device)
    settings = ParSettings(num_tokens=kept)
    steps = [grid[0]]

    with torch.no_grad():
        par = timed_median(lambda: reduce_per_image([features], [query_ids], [settings], embed, steps=steps),
                           repeats, device)
        rate = evs_pruning_rate(kept, len(features))
        evs = timed_median(lambda: compute_retention_mask(features, grid, merge, q=rate), repeats, device)
    out = {"repeats": repeats, "par_s": par, "evs_s": evs, "torch_threads": torch.get_num_threads(),
           "device": device, "hidden": hidden}
    if clip is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from benchmarks.diagnostics.temporal_repeats import video_features

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        own, _ = video_features(model, AutoProcessor.from_pretrained(path), *clip)
        own = own.to(device)
        out["clip_s"] = {}
        for name, keys in (("PAR", {}), *variants):
            setting = ParSettings.from_keys(keys, base=settings)
            with torch.no_grad():
                out["clip_s"][name] = timed_median(
                    lambda s=setting: reduce_per_image([own], [query_ids], [s], embed, steps=steps), repeats, device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--name", help="results file name after serve-video- (default: the model's name)")
    add_variant_argument(parser, "a further series through the PAR server, its requests sending these settings",
                         "unmerged:merge_repeats=false")
    parser.add_argument("--without-stock", action="store_true",
                        help="no stock vLLM server or series: EVS against PAR alone, for more repeats in the time")
    args = parser.parse_args()

    path, about = model_dir(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    grid = video_grid(path, args.frames, args.side)
    full, per_frame = grid[0] * grid[1] * grid[2] // 4, grid[1] * grid[2] // 4
    kept = ParSettings(keep_ratio=args.keep_ratio).num_kept(full)
    if kept < per_frame:
        raise SystemExit(f"--keep-ratio {args.keep_ratio} keeps {kept} of {full} tokens, under one frame pair's "
                         f"{per_frame}, which EVS always keeps: raise it or send more frames")
    common = server_args(args.frames, args.gpu)
    evs_label, par_label = f"vLLM+EVS K={kept}", f"vLLM+PAR K={kept}"
    variant_labels = [f"{name} K={kept}" for name, _ in args.variant]
    series = [*([] if args.without_stock else [("vLLM", "stock", {})]),
              (evs_label, "par", {"mm_processor_kwargs": {"par_method": "evs"}}), (par_label, "par", {})]
    series += [(label, "par", {"mm_processor_kwargs": keys}) for label, (_, keys) in zip(variant_labels, args.variant)]
    stock = (contextlib.nullcontext() if args.without_stock else
             VllmServer(path, extra_args=common, log_path=RESULTS / "serve-video-stock.log"))
    par = par_server(path, args.keep_ratio, common, RESULTS / "serve-video-par.log")
    RESULTS.mkdir(exist_ok=True)
    media = video_part(args.frames, args.side)
    runs: dict[tuple[str, int], list[dict]] = {}
    with stock, par, tqdm(total=args.repeats * len(levels) * len(series) * args.requests, desc="requests") as bar:
        servers = {"stock": stock, "par": par}
        for label, which, extra in series:  # warm-up, not measured
            one_request(servers[which].client(), media(10**6), args.max_tokens, extra, QUESTION)
        index, order = 0, random.Random(args.seed)
        for _ in range(args.repeats):
            for concurrency in levels:
                for label, which, extra in order.sample(series, len(series)):
                    runs.setdefault((label, concurrency), []).append(run_batch(
                        servers[which], concurrency, args.requests, index, args.max_tokens, extra, media, bar,
                        QUESTION))
                    index += args.requests
    for log in ("serve-video-stock.log", "serve-video-par.log"):
        (RESULTS / log).unlink(missing_ok=True)

    summary = {f"{label} @c{c}": summarize(r) for (label, c), r in runs.items()}
    device = describe_device(args.gpu)
    lines = [f"model: {about}; video: {args.frames} frames of {args.side}x{args.side} px, {full} visual tokens "
             f"({per_frame} per frame pair); device: {device}; {args.requests} requests x {args.repeats} repeats per "
             f"cell, {args.max_tokens} output tokens, caches off; median [min-max] over repeats",
             table_header(22)]
    for c in levels:
        for label, _, _ in series:
            lines.append(series_row(label, c, summary[f"{label} @c{c}"], 22))
    lines.append("\nRatios at the same concurrency (medians of per-repeat ratios):")
    ratios = {}
    for c in levels:
        evs_runs, par_runs = runs[(evs_label, c)], runs[(par_label, c)]

        def ratio(numerator, denominator, key, invert=False):
            values = [(d[key] / n[key]) if invert else (n[key] / d[key]) for n, d in zip(numerator, denominator)]
            return statistics.median(values)

        r = {"par_ttft_vs_evs": ratio(par_runs, evs_runs, "ttft_p50", invert=True),
             "par_rps_vs_evs": ratio(par_runs, evs_runs, "rps")}
        if args.without_stock:
            lines.append(f"  c={c}: PAR vs EVS: TTFT {r['par_ttft_vs_evs']:.2f}x, "
                         f"requests/s {r['par_rps_vs_evs']:.2f}x")
        else:
            stock_runs = runs[("vLLM", c)]
            r |= {"par_ttft_vs_stock": ratio(par_runs, stock_runs, "ttft_p50", invert=True),
                  "evs_ttft_vs_stock": ratio(evs_runs, stock_runs, "ttft_p50", invert=True),
                  "par_rps_vs_stock": ratio(par_runs, stock_runs, "rps")}
            lines.append(f"  c={c}: TTFT {r['par_ttft_vs_stock']:.2f}x lower than stock with PAR, "
                         f"{r['evs_ttft_vs_stock']:.2f}x with EVS (PAR vs EVS {r['par_ttft_vs_evs']:.2f}x); "
                         f"requests/s PAR/EVS {r['par_rps_vs_evs']:.2f}x, PAR/stock {r['par_rps_vs_stock']:.2f}x")
        r["par_ahead_of_evs"] = {"ttft": sum(p["ttft_p50"] <= e["ttft_p50"] for p, e in zip(par_runs, evs_runs)),
                                 "rps": sum(p["rps"] >= e["rps"] for p, e in zip(par_runs, evs_runs)),
                                 "repeats": len(par_runs)}
        lines.append(f"  c={c}: PAR at least as fast as EVS in {r['par_ahead_of_evs']['ttft']} of {len(par_runs)} "
                     f"repeats by TTFT p50, in {r['par_ahead_of_evs']['rps']} by requests/s")
        for (name, _), label in zip(args.variant, variant_labels):
            variant_runs = runs[(label, c)]
            r[f"{name}_ttft_vs_evs"] = ratio(variant_runs, evs_runs, "ttft_p50", invert=True)
            r[f"{name}_rps_vs_evs"] = ratio(variant_runs, evs_runs, "rps")
            lines.append(f"  c={c}: {name} vs EVS: TTFT {r[f'{name}_ttft_vs_evs']:.2f}x, "
                         f"requests/s {r[f'{name}_rps_vs_evs']:.2f}x")
        ratios[f"c={c}"] = r
    selection = selection_seconds(path, grid, kept, "cuda" if args.gpu else "cpu",
                                  clip=(clip_frames(0, args.frames, args.side), clip_metadata(args.frames)),
                                  variants=tuple(args.variant))
    lines.append(f"\nChoosing one clip's {kept} of {full} tokens in the model executor, timed directly (median of "
                 f"{selection['repeats']}, random features of width {selection['hidden']}, "
                 f"{selection['torch_threads']} torch threads): PAR {selection['par_s'] * 1e3:.1f} ms, "
                 f"EVS {selection['evs_s'] * 1e3:.1f} ms")
    lines.append("On the first request's clip, its tower's own tokens: " + ", ".join(
        f"{name} {seconds * 1e3:.1f} ms" for name, seconds in selection["clip_s"].items()))
    write_report(f"serve-video-{args.name or Path(args.model).name}", lines, {
        "model": about, "device": device, "args": vars(args), "video_tokens": full, "kept": kept,
        "summary": summary, "ratios": ratios, "selection": selection,
        # Every repeat's batch, in run order, so that runs of the same command can be pooled.
        "runs": {f"{label} @c{c}": batches for (label, c), batches in runs.items()}})


if __name__ == "__main__":
    main()
