"""PAR's own time and peak extra memory per image, as the number of visual tokens grows.

A dynamic-resolution model gives one photo thousands of visual tokens (Qwen2.5-VL: a
3584x3584 image is over 16,000). PAR's pairwise steps (near-duplicates, density peaks,
routing) compare tokens with each other: through N x N matrices up to
`par_vllm.reduction.FULL_MATRIX_MAX` tokens, a tile at a time above (par_vllm/blocked.py).
This measures what one image costs the plugin's own reduction
(`par_vllm.dispatch.reduce_per_image`, default settings, K = ceil(0.111 N)) at N = 1,024,
3,072 (the most through full N x N matrices), 4,096 and 16,384 tokens of width D
(Qwen2.5-VL-7B's 3,584 by default).

Each N runs in a fresh process. Peak extra memory is measured two ways. "tensors": the
most bytes of tensors alive at once during the reduction, beyond its inputs, summed from
torch's own allocation and free events (on a GPU the CUDA allocator's peak): what the
reduction itself holds, the same from run to run. "RSS": the process's peak resident set
less what it held before, which also counts what glibc's allocator keeps after a free, and
so varies from run to run (benchmarks/results/README.md).

    python -m benchmarks.par_cost [--sizes 1024 3072 4096 16384] [--dim 3584] [--gpu]
Writes benchmarks/results/par-cost-{cpu,gpu}.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def peak_tensor_bytes(run) -> int:
    """The most bytes of CPU tensors alive at once while `run()` runs, counting only what it
    allocates: torch's profiler records every allocation and free with its time (a private
    interface of torch's profiler, hence the check)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as trace:
        run()
    changes, pending = [], list(trace.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    if not changes:
        raise RuntimeError("torch's profiler recorded no allocation: cannot measure tensor memory")
    live = peak = 0
    for _, size in sorted(changes):
        live += size
        peak = max(peak, live)
    return peak


def measure(num_visual: int, dim: int, device: str, repeats: int) -> dict:
    """One N, in this process: median seconds per image and peak extra bytes."""
    import torch

    from par_vllm.dispatch import reduce_per_image
    from par_vllm.settings import ParSettings

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(num_visual, dim, generator=generator).to(device)
    embed = torch.nn.Embedding(1000, dim).to(device)
    query = torch.tensor([11, 42, 97], device=device)
    settings = ParSettings()

    def run():
        with torch.no_grad():
            out = reduce_per_image([features], [query], [settings], embed)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kept = run()[0].shape[0]
        extra = tensors = torch.cuda.max_memory_allocated() - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kept = run()[0].shape[0]
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if device != "cuda":  # last: the profiler's records would count in the resident set
        tensors = peak_tensor_bytes(run)
    from par_vllm.reduction import FULL_MATRIX_MAX

    return {"num_visual": num_visual, "kept": kept, "dim": dim, "seconds": statistics.median(times),
            "path": "tiles" if num_visual > FULL_MATRIX_MAX else "N x N",
            "peak_extra_bytes": extra, "peak_tensor_bytes": tensors, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 3072, 4096, 16384])
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process's N
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.one:
        print(json.dumps(measure(args.one, args.dim, device, args.repeats)))
        return

    rows = []
    for n in args.sizes:
        command = [sys.executable, "-m", "benchmarks.par_cost", "--one", str(n), "--dim", str(args.dim),
                   "--repeats", str(args.repeats), *(["--gpu"] if args.gpu else [])]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    if args.gpu:
        import torch

        where = f"GPU ({torch.cuda.get_device_name(0)})"
    else:
        import torch

        from benchmarks.common import cpu_words

        where = f"CPU ({cpu_words()}, {torch.get_num_threads()} torch threads)"
    lines = [(f"PAR's own reduction of one image (reduce_per_image, default settings, torch reference), "
              f"D = {args.dim}, random tokens; {where}; median of {args.repeats}"),
             ("peak extra memory in MiB: tensors alive at once (torch's allocation events), and the "
              "process's resident set (also what the C allocator keeps; varies from run to run)"),
             f"{'N':>7} {'K':>6} {'path':>6} {'seconds':>9} {'tensors MiB':>12} {'RSS MiB':>9}"]
    for row in rows:
        lines.append(f"{row['num_visual']:>7} {row['kept']:>6} {row['path']:>6} {row['seconds']:>9.3f} "
                     f"{row['peak_tensor_bytes'] / 2**20:>12.1f} {row['peak_extra_bytes'] / 2**20:>9.1f}")
    report = "\n".join(lines)
    print(report)
    name = f"par-cost-{device if device == 'cpu' else 'gpu'}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.txt").write_text(report + "\n")
    (args.out / f"{name}.json").write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
