"""Where a video request's time goes on the PAR server: PAR against EVS, sampled in the
server's own processes while serve_video.py's requests run.

serve_video.py measures PAR's and EVS's TTFT and requests/s from the client; their
difference at concurrency 4 is larger than the selection alone, timed outside the server,
explains. This runs the same PAR server (EVS is `par_method=evs` on it), the same clips
and the same batches, and samples every server process with py-spy (`pip install
py-spy`; it reads the processes' stacks from outside, with no change to vLLM or the
plugin) while one series' batch runs. Per series it reports thread-seconds per request
(samples / rate / requests: the Python threads found busy, each counted once, so a torch
op's own worker threads are not counted apart) spent in each process and in named
stages, and the functions whose time differs most between the two series.

    python -m benchmarks.diagnostics.serve_profile --model smollm-qwen --keep-ratio 0.111
Writes benchmarks/results/serve-profile-<model or --name>.{txt,json}.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from benchmarks.common import write_results
from benchmarks.serve import RESULTS, describe_device, model_dir, one_request, run_batch
from benchmarks.serve_video import (
    QUESTION,
    add_clip_arguments,
    par_server,
    server_args,
    video_grid,
    video_part,
)
from par_vllm.settings import ParSettings

SERIES = {"EVS": {"mm_processor_kwargs": {"par_method": "evs"}}, "PAR": {}}
# Named stages: a sample counts in a stage when the stage's function is on its stack.
STAGES = {
    "vision tower": "_process_video_input",
    "PAR or EVS, with positions (_reduce)": "_reduce",
    "  PAR reduction (reduce_per_image)": "reduce_per_image",
    "  EVS selection (compute_retention_mask)": "compute_retention_mask",
    "kept tokens' positions (recompute_mrope_positions)": "recompute_mrope_positions",
    "prompt positions (get_mrope_input_positions)": "get_mrope_input_positions",
    "multimodal processor (apply)": "_cached_apply_hf_processor",
    "video decoding (load_bytes)": "load_bytes",
    "model forward (execute_model)": "execute_model",
}


def frame_function(frame: str) -> str:
    """'Class.name (file.py)' -> 'name', the name STAGES gives."""
    return frame.split(" (", 1)[0].rsplit(".", 1)[-1]


class Sampler:
    """py-spy recording one process tree while the `with` block runs; its stacks (with their
    sample counts) in `stacks` after it."""

    def __init__(self, pid: int, rate: int):
        self.pid, self.rate = pid, rate

    def __enter__(self):
        self.path = Path(tempfile.mkstemp(suffix=".txt")[1])
        self.process = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.pid), "--subprocesses", "--nonblocking", "--nolineno",
             "--rate", str(self.rate), "--format", "raw", "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=60)
        self.stacks = Counter()
        for line in self.path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                self.stacks[stack] += int(count)
        self.path.unlink()
        if not self.stacks:
            raise RuntimeError(f"py-spy recorded nothing: {err.decode()[-500:]}")


def process_name(stack: str) -> str:
    """The sampled process: py-spy nests each child under its parent ('process 123:"cmdline"'
    frames), so the innermost such frame names it."""
    command = ([frame for frame in stack.split(";") if frame.startswith("process ")] or [""])[-1].partition(":")[2]
    return {'"VLLM::Worker"': "worker (model executor)", '"VLLM::EngineCore"': "engine core (scheduler)"}.get(
        command, "API server (processor, HTTP)")


def tally(stacks: Counter) -> dict:
    """Samples per process, per named stage and per function (each function once per stack)."""
    processes, stages, functions = Counter(), Counter(), Counter()
    for stack, count in stacks.items():
        frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
        names = {frame_function(f) for f in frames}
        qualified = {f.split(" (", 1)[0] for f in frames}
        processes[process_name(stack)] += count
        for stage, function in STAGES.items():
            if function in names:
                stages[stage] += count
        for name in qualified:
            functions[name] += count
    return {"processes": processes, "stages": stages, "functions": functions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="requests per batch")
    parser.add_argument("--repeats", type=int, default=3, help="batches per series, in a seeded shuffled order")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file name after serve-profile- (default: the model's name)")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")

    path, about = model_dir(args.model)
    grid = video_grid(path, args.frames, args.side)
    full = grid[0] * grid[1] * grid[2] // 4
    kept = ParSettings(keep_ratio=args.keep_ratio).num_kept(full)
    media = video_part(args.frames, args.side)
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "serve-profile-par.log"
    tallies = {name: {"processes": Counter(), "stages": Counter(), "functions": Counter()} for name in SERIES}
    runs = {name: [] for name in SERIES}

    with par_server(path, args.keep_ratio, server_args(args.frames, args.gpu), log) as server:
        for extra in SERIES.values():  # warm-up, not sampled
            one_request(server.client(), media(10**6), args.max_tokens, extra, QUESTION)
        index, order = 0, random.Random(args.seed)
        for _ in range(args.repeats):
            for name in order.sample(list(SERIES), len(SERIES)):
                with Sampler(server.process.pid, args.rate) as sampler:
                    runs[name].append(run_batch(server, args.concurrency, args.requests, index, args.max_tokens,
                                                SERIES[name], media, tqdm(disable=True), QUESTION))
                index += args.requests
                for key, counts in tally(sampler.stacks).items():
                    tallies[name][key].update(counts)
    log.unlink(missing_ok=True)

    requests = args.repeats * args.requests

    def per_request(samples: int) -> float:
        return samples / args.rate / requests

    evs, par = tallies["EVS"], tallies["PAR"]
    lines = [f"model: {about}; video: {args.frames} frames of {args.side}x{args.side} px, {full} visual tokens, "
             f"K={kept}; device: {describe_device(args.gpu)}; concurrency {args.concurrency}, {args.requests} "
             f"requests x {args.repeats} batches per series, {args.max_tokens} output tokens; py-spy at "
             f"{args.rate}/s on every server process: busy Python thread-seconds per request",
             "", f"{'':52} {'EVS':>8} {'PAR':>8} {'PAR-EVS':>8}"]

    def row(label: str, a: int, b: int) -> str:
        return f"{label:52} {per_request(a):8.3f} {per_request(b):8.3f} {per_request(b - a):+8.3f}"

    for process in sorted(set(evs["processes"]) | set(par["processes"])):
        lines.append(row(f"process: {process}", evs["processes"][process], par["processes"][process]))
    lines.append(row("all processes", sum(evs["processes"].values()), sum(par["processes"].values())))
    lines.append("")
    for stage in STAGES:
        lines.append(row(stage, evs["stages"][stage], par["stages"][stage]))
    lines.append("\nFunctions whose time differs most (inclusive: a function counts once per stack):")
    differing = sorted(set(evs["functions"]) | set(par["functions"]),
                       key=lambda f: -abs(par["functions"][f] - evs["functions"][f]))
    for function in differing[:20]:
        lines.append(row(function[:52], evs["functions"][function], par["functions"][function]))
    medians = {name: statistics.median(r["ttft_p50"] for r in series) for name, series in runs.items()}
    rps = {name: statistics.median(r["rps"] for r in series) for name, series in runs.items()}
    lines.append("\nWhile sampled (py-spy slows the server a little): TTFT p50 " + ", ".join(
        f"{name} {medians[name]:.3f} s" for name in SERIES) + "; requests/s " + ", ".join(
        f"{name} {rps[name]:.2f}" for name in SERIES))
    text = "\n".join(lines)
    print(text)
    write_results(RESULTS / f"serve-profile-{args.name or Path(args.model).name}", text + "\n", {
        "model": about, "args": vars(args), "kept": kept, "video_tokens": full,
        "runs": runs, "tallies": {name: {k: dict(v) for k, v in t.items() if k != "functions"}
                                  for name, t in tallies.items()},
        "functions": {name: dict(t["functions"].most_common(200)) for name, t in tallies.items()}})


if __name__ == "__main__":
    main()
