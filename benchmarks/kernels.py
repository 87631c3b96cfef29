"""Torch reference vs Triton kernels for PAR's hot steps, on a GPU.

For LLaVA-1.5 shapes (N 576, D 4096, bf16, B 1..256, T 16..256) and LLaVA-NeXT shapes
(N 2880): median time over CUDA-event-timed repeats, achieved GB/s of the relevance pass
(bytes of visual tokens + prompts read) against the measured device-to-device copy
bandwidth, speedups, and the whole reduction's time per image against the LLaVA-1.5-7B
prefill time it saves (FLOPs from benchmarks/flops.py at the measured bf16 GEMM rate); and,
at the same shapes, how far the kernels' results lie from the reference's (relevance,
merged tokens, and the share of images whose whole reduction keeps the same tokens).

    python -m benchmarks.kernels            # on a CUDA machine
    python -m benchmarks.kernels --smoke    # tiny shapes on any machine (a CPU runs the
                                            # kernels under TRITON_INTERPRET=1): checks the script
Writes benchmarks/results/kernels-<device>.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"


def timer(device: str, repeats: int):
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter elsewhere)."""
    def run(fn) -> float:
        fn()  # warm-up and compile
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    return run


def copy_bandwidth(device: str, measure) -> float:
    """GB/s of a device-to-device copy (read + write counted)."""
    x = torch.empty(256 * 2**20 if device == "cuda" else 2**22, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = measure(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def gemm_tflops(device: str, measure) -> float:
    n = 8192 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = measure(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def agreement(reference_rel, kernel_rel, reference_merged, kernel_merged, reference, kernel) -> dict:
    """The kernels against the torch reference at one shape: the largest relevance and
    merged-token differences, and the share of images whose whole reduction (`reference`,
    `kernel`: par_reduce's Reductions) keeps the same tokens (where scores tie within float
    error either choice is right, so below 1 is a reason to look, not a failure by itself;
    tests/test_kernels.py holds the exact checks)."""
    same = (reference.kept_indices == kernel.kept_indices).all(dim=1)
    token_diff = ((reference.tokens[same].float() - kernel.tokens[same].float()).abs().max().item()
                  if same.any() else None)
    return {"relevance_max_diff": (kernel_rel.float() - reference_rel).abs().max().item(),
            "route_merge_max_diff": (kernel_merged.float() - reference_merged.float()).abs().max().item(),
            "same_kept_share": same.float().mean().item(), "reduce_token_max_diff": token_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            RESULTS.mkdir(exist_ok=True)
            note = ("No GPU was available where this ran; nothing was measured. Run "
                    "`python -m benchmarks.kernels` on a CUDA machine to fill this in "
                    "(`bash scripts/gpu_checks.sh` runs it with the kernel tests and par_cost).\n")
            (RESULTS / "kernels-no-gpu.txt").write_text(note)
            print(note)
            return
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from par_vllm.kernels import relevance_topk, route_merge

    from benchmarks.flops import MODELS
    from par_vllm.reduction import merge as reference_merge
    from par_vllm.reduction import near_duplicates, par_reduce, relevance, retrieve, route
    from par_vllm.settings import ParSettings

    measure = timer(device, 3 if args.smoke else args.repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    copy_gbs = copy_bandwidth(device, measure)
    tflops = gemm_tflops(device, measure)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        shapes = [("smoke", 2, 64, 32, 8, 8)]
    else:
        shapes = [("LLaVA-1.5", b, 576, 4096, t, 64) for b in (1, 16, 64, 256) for t in (16, 256)]
        shapes += [("LLaVA-NeXT", b, 2880, 4096, 64, 320) for b in (1, 16, 64)]

    # Prefill time PAR saves per LLaVA-1.5-7B image, at the measured bf16 GEMM rate.
    llava7b = MODELS[0].decoder
    saved_ms = (llava7b.prefill(40 + 576) - llava7b.prefill(40 + 64)) / (tflops * 1e12) * 1e3

    rows = []
    for family, batch, n, d, t, k in shapes:
        visual = torch.randn(batch, n, d, device=device, dtype=dtype)
        query = F.normalize(torch.randn(batch, t, d, device=device), dim=-1)
        mask = torch.ones(batch, t, dtype=torch.bool, device=device)
        visual_n = F.normalize(visual.float(), dim=-1)

        ref_rel = measure(lambda: torch.sort(relevance(F.normalize(visual.float(), dim=-1), query, mask, "max")[0],
                                             dim=-1, descending=True, stable=True))
        tri_rel = measure(lambda: relevance_topk.relevance_topk(visual, query, mask, "max", k))
        rel_bytes = visual.numel() * visual.element_size() + query.numel() * 4 + batch * n * 4

        rel = relevance(visual_n, query, mask, "max")[0]
        retrieved = retrieve(rel, k, 1.5, 0.5)
        sim = visual_n @ visual_n.transpose(1, 2)
        duplicates = near_duplicates(sim, retrieved, 0.9)
        kept = torch.argsort(rel, dim=1, descending=True)[:, :k].sort(dim=1).values
        weight = torch.exp(rel)

        def reference_route_merge():
            assignment = route(visual_n @ visual_n.transpose(1, 2), kept, retrieved, duplicates)
            return reference_merge(visual, weight, kept, assignment)

        ref_rm = measure(reference_route_merge)
        tri_rm = measure(lambda: route_merge.route_merge(visual, visual_n, weight, kept, retrieved, duplicates))

        ref_all = measure(lambda: par_reduce(visual, query, mask, k, ParSettings(backend="torch")))
        tri_all = measure(lambda: par_reduce(visual, query, mask, k, ParSettings(backend="triton")))
        rows.append({**agreement(
            rel, relevance_topk.relevance(visual, query, mask, "max"),
            reference_route_merge(), route_merge.route_merge(visual, visual_n, weight, kept, retrieved, duplicates)[0],
            *(par_reduce(visual, query, mask, k, ParSettings(backend=backend)) for backend in ("torch", "triton"))),
            "shape": family, "B": batch, "N": n, "D": d, "T": t, "K": k,
            "relevance_ref_ms": ref_rel, "relevance_triton_ms": tri_rel,
            "relevance_GBps": rel_bytes / (tri_rel * 1e-3) / 1e9,
            "relevance_pct_of_copy": 100 * rel_bytes / (tri_rel * 1e-3) / 1e9 / copy_gbs,
            "relevance_speedup": ref_rel / tri_rel,
            "route_merge_ref_ms": ref_rm, "route_merge_triton_ms": tri_rm,
            "route_merge_speedup": ref_rm / tri_rm,
            "reduce_ref_ms": ref_all, "reduce_triton_ms": tri_all,
            "reduce_per_image_ms": tri_all / batch,
            "reduce_pct_of_saved_prefill": 100 * (tri_all / batch) / saved_ms if n == 576 else None,
        })
        print(f"done {family} B={batch} T={t}", flush=True)

    header = (f"device: {name}; copy bandwidth {copy_gbs:.0f} GB/s; bf16 GEMM {tflops:.0f} TFLOP/s; "
              f"LLaVA-1.5-7B prefill saved per image at 64/576 (40 text tokens): {saved_ms:.2f} ms")
    lines = [header,
             f"{'shape':<10} {'B':>4} {'T':>4} {'rel ref':>8} {'rel tri':>8} {'GB/s':>6} {'%copy':>6} "
             f"{'x':>5} {'rm ref':>8} {'rm tri':>8} {'x':>5} {'all ref':>8} {'all tri':>8} {'ms/img':>7} {'%saved':>6}"
             f" {'rel diff':>8} {'rm diff':>8} {'same kept':>9} {'out diff':>8}"]
    for r in rows:
        pct = f"{r['reduce_pct_of_saved_prefill']:.2f}" if r["reduce_pct_of_saved_prefill"] is not None else "-"
        out_diff = f"{r['reduce_token_max_diff']:.1e}" if r["reduce_token_max_diff"] is not None else "-"
        lines.append(
            f"{r['shape']:<10} {r['B']:>4} {r['T']:>4} {r['relevance_ref_ms']:>8.3f} {r['relevance_triton_ms']:>8.3f} "
            f"{r['relevance_GBps']:>6.0f} {r['relevance_pct_of_copy']:>6.1f} {r['relevance_speedup']:>5.1f} "
            f"{r['route_merge_ref_ms']:>8.3f} {r['route_merge_triton_ms']:>8.3f} {r['route_merge_speedup']:>5.1f} "
            f"{r['reduce_ref_ms']:>8.3f} {r['reduce_triton_ms']:>8.3f} {r['reduce_per_image_ms']:>7.3f} {pct:>6}"
            f" {r['relevance_max_diff']:>8.1e} {r['route_merge_max_diff']:>8.1e} {r['same_kept_share']:>9.2f}"
            f" {out_diff:>8}"
        )
    report = "\n".join(lines)
    print(report)
    if args.smoke:
        return  # interpreter timings mean nothing: the smoke run only checks the script
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    (RESULTS / f"kernels-{slug}.txt").write_text(report + "\n")
    (RESULTS / f"kernels-{slug}.json").write_text(json.dumps({"device": name, "copy_GBps": copy_gbs,
                                                             "gemm_TFLOPs": tflops, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
