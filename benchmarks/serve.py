"""Plain vLLM vs vLLM + PAR, side by side in one run, through the OpenAI API.

Starts two real vLLM servers on 127.0.0.1 (stock LlavaForConditionalGeneration, and
the PAR architecture at a budget), then drives both, alternating, with the same image
requests through the `openai` client at several concurrency levels, repeated; the order
of the series is shuffled (seeded) in every repeat and level, so no series always runs
first. A third series sends requests to the PAR server with `par_num_tokens = N - 1`: the
reduction runs in full but saves almost nothing, so it measures PAR's own processing cost
end to end. Because that difference can sit below a CPU's noise, PAR's own work per
request (prompt rewrite in the frontend, reduction in the executor: the plugin's own
functions on the model's shapes) is also timed directly and reported as a share of
stock vLLM's latency measured in the same run.

Caches are off (every request has its own image anyway) so each request pays its full
prefill. Per series: time to first token (p50, p95), end-to-end latency, requests per
second, prompt tokens per request, peak KV-cache usage sampled from /metrics.

    python -m benchmarks.serve --model smollm        # LLaVA with SmolLM2-135M-Instruct
    python -m benchmarks.serve --model smollm-next --keep-ratio 0.111   # the same in a LLaVA-NeXT, 672 px
    python -m benchmarks.serve --model demo          # tiny random-weight LLaVA
    python -m benchmarks.serve --model smollm-qwen --keep-ratio 0.111   # Qwen2.5-VL, 448 and 896 px
    python -m benchmarks.serve --model smollm-qwen --keep-ratio 0.111 --sizes 1792,3584 --concurrency 1 \
        --requests 2 --repeats 1 --name smollm-qwen-large   # 4,096 and 16,384 visual tokens an image
    python -m benchmarks.serve --model DIR --gpu     # any LLaVA checkpoint on a GPU
Writes benchmarks/results/serve-<model or --name>.{txt,json,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmarks.common import cpu_words, make_smollm_llava, make_smollm_llava_next, make_smollm_qwen
from par_vllm import PLACES_ROWS, par_architecture
from par_vllm.demo import image_data_url
from par_vllm.server import CPU_ENGINE_ARGS, VllmServer, par_engine_args, par_overrides
from par_vllm.settings import ParSettings

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
QUESTION = "What is the color of the largest shape in this picture?"


def model_dir(name: str) -> tuple[Path, str]:
    from par_vllm.demo_model import make_demo_model

    builders = {
        "demo": (make_demo_model, "tiny random-weight LLaVA (2-layer, hidden 128)"),
        "smollm": (make_smollm_llava, "LLaVA with SmolLM2-135M-Instruct (real weights) and a "
                                      "small random-weight vision tower, 576 tokens per image"),
        "smollm-next": (make_smollm_llava_next, "LLaVA-NeXT with SmolLM2-135M-Instruct (real weights) and a "
                                                "small random-weight vision tower, 672x672 images: 2,880 "
                                                "visual tokens and 48 separators"),
        "smollm-qwen": (make_smollm_qwen, "Qwen2.5-VL with SmolLM2-135M-Instruct (real weights) and a small "
                                          "random-weight vision tower; dynamic resolution"),
    }
    if name not in builders:
        return Path(name), name
    build, about = builders[name]
    path = ROOT / ".models" / name
    if not (path / "config.json").exists():
        build(path)
    return path, about


def engine_room(path: Path, most_visual: int) -> tuple[list[str], dict, str]:
    """(vLLM flags, environment, a note for the results) with room for the largest image's
    whole prompt in one prefill and in the encoder cache, which vLLM sizes from
    --max-num-batched-tokens: at least 4,096 (a whole LLaVA-NeXT image, 2,928 rows at
    672 px). A length past the checkpoint's max_position_embeddings is allowed and noted: a
    Qwen-VL image takes positions along its grid, far fewer than its tokens, so a prompt's
    positions stay in range (a LLaVA's would not)."""
    room = max(4096, -(-(most_visual + 512) // 256) * 256)
    flags = ["--max-model-len", str(room), "--max-num-batched-tokens", str(room)]
    config = json.loads((path / "config.json").read_text())
    positions = config.get("text_config", config).get("max_position_embeddings")
    if positions is None or room <= positions:
        return flags, {}, ""
    return (flags, {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
            f", --max-model-len {room}, past the checkpoint's max_position_embeddings ({positions})")


def visual_tokens(path: Path, saved: dict, size: int) -> int:
    """N for a size x size image: Qwen-VL's from its processor's grid, a LLaVA's as saved."""
    if saved.get("family") not in ("qwen2_5_vl", "qwen3_vl"):
        return saved.get("visual_tokens_per_image", 576)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    grid = processor.image_processor(Image.new("RGB", (size, size)), return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


def request_image(i: int, size: int) -> Image.Image:
    rng = np.random.default_rng(i)  # a different image per request: no cache can help
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


class KvPeak:
    """Samples vllm:kv_cache_usage_perc while a batch runs; keeps the maximum."""

    def __init__(self, server: VllmServer):
        self.server, self.peak, self._stop = server, 0.0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            for line in self.server.get("/metrics").splitlines():
                if line.startswith("vllm:kv_cache_usage_perc"):
                    self.peak = max(self.peak, float(line.split()[-1]))
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def image_part(size: int):
    """Request i's content part: its own size x size image."""
    return lambda i: {"type": "image_url", "image_url": {"url": image_data_url(request_image(i, size))}}


def one_request(client, part: dict, max_tokens: int, extra: dict, question: str = QUESTION) -> dict:
    """One streamed chat request whose content is `part` (an encoded image or video) and a question.
    The part is encoded before the clock starts: TTFT is the server's, from the request's send.
    Every request generates exactly `max_tokens` tokens (vLLM's `ignore_eos`): a series whose
    answers ended early would otherwise free its batch slots sooner and look faster."""
    start = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model="par-demo", max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={**extra, "ignore_eos": True},
        messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def run_batch(server, concurrency, requests, first_index, max_tokens, extra, media, bar,
              question: str = QUESTION) -> dict:
    client = server.client()
    # Encoding a PNG or an MP4 takes the client a good share of a request's TTFT on a CPU, and
    # competes for the cores while the server runs: done for the whole batch before it starts.
    parts = [media(first_index + i) for i in range(requests)]
    with KvPeak(server) as kv, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        futures = [pool.submit(one_request, client, part, max_tokens, extra, question) for part in parts]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update(1)
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    return {
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
        "latency_p50": float(np.median([r["latency"] for r in results])),
        "rps": requests / wall,
        "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in results),
        "completion_tokens": statistics.mean(r["completion_tokens"] for r in results),
        "kv_peak": kv.peak,
    }


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def describe_device(gpu: bool) -> str:
    """What the results were measured on, by name, for the results file."""
    if gpu:
        import torch

        return f"GPU ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible)"
    return f"CPU ({cpu_words()})"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How a run is shaped, the same in every serving benchmark."""
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", type=int, default=8, help="requests per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gpu", action="store_true", help="vLLM's default engine settings (bf16, graphs)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the series order")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm", help="demo, smollm, or a checkpoint directory")
    parser.add_argument("--budget", type=int, default=64, help="PAR tokens per image (K)")
    parser.add_argument("--keep-ratio", type=float, help="PAR's budget as a share of each image's visual "
                        "tokens instead of --budget")
    add_run_arguments(parser)
    parser.add_argument("--sizes", help="image sides in px, comma-separated (Qwen-VL: any; default "
                        "448,896 for Qwen-VL, the checkpoint's own size otherwise)")
    parser.add_argument("--name", help="results file name after serve- (default: the model's name)")
    args = parser.parse_args()

    path, about = model_dir(args.model)
    architecture = par_architecture(json.loads((path / "config.json").read_text())["architectures"])
    if args.sizes is None and architecture in PLACES_ROWS:
        args.sizes = "448,896"
    levels = [int(c) for c in args.concurrency.split(",")]
    saved = json.loads((path / "par_model.json").read_text()) if (path / "par_model.json").exists() else {}
    # Qwen-VL takes any size; a LLaVA checkpoint has the one it was saved with.
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [saved.get("image_size", 336)]
    visual = {size: visual_tokens(path, saved, size) for size in sizes}
    room, env, room_note = engine_room(path, max(visual.values()))
    engine = room if args.gpu else [*CPU_ENGINE_ARGS, *room]
    common = [*engine, "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
              "--trust-request-mm-kwargs"]
    budget = {"keep_ratio": args.keep_ratio} if args.keep_ratio else {"num_tokens": args.budget}

    def series_at(size: int) -> list[tuple[str, str, dict]]:
        n_tokens = visual[size]
        at = f" {size}px" if len(sizes) > 1 else ""
        return [(f"vLLM{at}", "stock", {}),
                (f"vLLM+PAR K={ParSettings(**budget).num_kept(n_tokens)}{at}", "par", {}),
                (f"vLLM+PAR K={n_tokens - 1} (overhead){at}", "par",
                 {"mm_processor_kwargs": {"par_num_tokens": n_tokens - 1}})]

    # vLLM profiles its largest image at start-up, which takes longer the more room it is given.
    server_options = {"env": env, "startup_timeout": 1200}
    stock = VllmServer(path, extra_args=common, log_path=RESULTS / "serve-stock.log", **server_options)
    par = VllmServer(path, hf_overrides=par_overrides(architecture=architecture, **budget),
                     extra_args=[*common, *par_engine_args(architecture)], log_path=RESULTS / "serve-par.log",
                     **server_options)
    RESULTS.mkdir(exist_ok=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    total = args.repeats * len(levels) * 3 * len(sizes) * args.requests
    with stock, par, tqdm(total=total, desc="requests") as bar:
        servers = {"stock": stock, "par": par}
        for name in servers:  # warm-up, not measured
            for i in range(2):
                one_request(servers[name].client(), image_part(sizes[0])(10**6 + i), args.max_tokens, {})
        index = 0
        order = random.Random(args.seed)
        for size in sizes:
            for _ in range(args.repeats):
                for concurrency in levels:
                    for label, which, extra in order.sample(series_at(size), 3):
                        result = run_batch(servers[which], concurrency, args.requests, index,
                                           args.max_tokens, extra, image_part(size), bar)
                        runs.setdefault((label, concurrency), []).append(result)
                        index += args.requests
    for log in ("serve-stock.log", "serve-par.log"):
        (RESULTS / log).unlink(missing_ok=True)
    # Timed after the servers are gone, so nothing else competes for the cores.
    device_name = "cuda" if args.gpu else "cpu"
    own_work = {size: par_own_work(path, visual[size], ParSettings(**budget).num_kept(visual[size]), device_name)
                for size in sizes}

    summary = {f"{label} @c{c}": summarize(r) for (label, c), r in runs.items()}
    device = describe_device(args.gpu)
    lines = [f"model: {about}; images {', '.join(f'{s}x{s} ({visual[s]} visual tokens)' for s in sizes)}; "
             f"device: {device}; {args.requests} requests x {args.repeats} repeats "
             f"per cell, {args.max_tokens} output tokens, caches off{room_note}; median [min-max] over repeats",
             table_header(40)]
    for (label, c), _ in runs.items():
        lines.append(series_row(label, c, summary[f"{label} @c{c}"], 40))
    lines.append("\nRatios, PAR vs vLLM at the same concurrency (medians of per-repeat ratios):")
    ratios = {}
    for size in sizes:
        series = series_at(size)
        for c in levels:
            base, red, over = (runs[(label, c)] for label, _, _ in series)
            r = {
                "prompt_tokens_reduction_pct": 100 * (1 - red[0]["prompt_tokens"] / base[0]["prompt_tokens"]),
                "ttft_speedup": statistics.median(b["ttft_p50"] / p["ttft_p50"] for b, p in zip(base, red)),
                "throughput_gain": statistics.median(p["rps"] / b["rps"] for b, p in zip(base, red)),
                "par_overhead_pct": statistics.median(100 * (o["latency_p50"] / b["latency_p50"] - 1)
                                                      for b, o in zip(base, over)),
            }
            key = c if len(sizes) == 1 else f"{size}px c={c}"
            ratios[key] = r
            lines.append(f"  {key if len(sizes) > 1 else f'c={c}'}: prompt tokens "
                         f"-{r['prompt_tokens_reduction_pct']:.1f}%, TTFT "
                         f"{r['ttft_speedup']:.2f}x lower, throughput {r['throughput_gain']:.2f}x, "
                         f"PAR at K=N-1 adds {r['par_overhead_pct']:+.1f}% latency")
        stock_latency = statistics.median(r["latency_p50"] for r in runs[(series[0][0], levels[0])])
        stock_ttft = statistics.median(r["ttft_p50"] for r in runs[(series[0][0], levels[0])])
        work = own_work[size]
        lines.append(f"\nPAR's own work per single-image request at {size}x{size}, timed directly (median of "
                     f"{work['repeats']}): prompt rewrite {1e3 * work['rewrite_s']:.2f} ms")
        for k, seconds in work["reduce_s"].items():
            share = 100 * (work["rewrite_s"] + seconds) / stock_latency
            ttft_share = 100 * (work["rewrite_s"] + seconds) / stock_ttft
            ratios.setdefault("own_work_pct_of_stock_latency", {})[f"{size}px K={k}"] = share
            ratios.setdefault("own_work_pct_of_stock_ttft", {})[f"{size}px K={k}"] = ttft_share
            lines.append(f"  reduction {visual[size]} -> {k} tokens: {1e3 * seconds:.2f} ms; with the rewrite "
                         f"{share:.2f}% of stock vLLM's p50 latency, {ttft_share:.2f}% of its p50 TTFT "
                         f"at c={levels[0]} ({stock_latency:.2f} s, {stock_ttft:.2f} s)")
    slug = args.name or Path(args.model).name
    write_report(f"serve-{slug}", lines, {"model": about, "device": device, "args": vars(args), "summary": summary,
                                          "ratios": ratios, "own_work": own_work})
    plot(runs, levels, [x for size in sizes for x in series_at(size)], RESULTS / f"serve-{slug}.png", about)


def table_header(width: int) -> str:
    return (f"{'series':<{width}} {'conc':>4} {'TTFT p50 s':>18} {'TTFT p95 s':>8} {'latency s':>9} "
            f"{'req/s':>16} {'prompt tok':>10} {'out tok':>7} {'KV peak':>8}")


def series_row(label: str, concurrency: int, s: dict, width: int) -> str:
    """One series' line of a results table (medians [min-max] over repeats)."""
    return (f"{label:<{width}} {concurrency:>4} {s['ttft_p50']['median']:>7.3f} [{s['ttft_p50']['min']:.2f}-"
            f"{s['ttft_p50']['max']:.2f}] {s['ttft_p95']['median']:>8.3f} {s['latency_p50']['median']:>9.3f}"
            f" {s['rps']['median']:>6.2f} [{s['rps']['min']:.2f}-{s['rps']['max']:.2f}]"
            f" {s['prompt_tokens']['median']:>10.0f} {s['completion_tokens']['median']:>7.1f}"
            f" {100 * s['kv_peak']['median']:>7.2f}%")


def write_report(name: str, lines: list[str], payload: dict) -> None:
    """Print the report and write it to results/NAME.txt, with its figures in NAME.json."""
    report = "\n".join(lines)
    print(report)
    (RESULTS / f"{name}.txt").write_text(report + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))


def timed_median(fn, repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls of fn after one warm-up call (synchronised on a GPU)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def par_own_work(path: Path, n_tokens: int, budget: int, device: str, repeats: int | None = None) -> dict:
    """Seconds PAR adds to one request, using the plugin's own functions: the frontend's
    prompt rewrite (decode, strip, re-encode) and the executor's reduction of one image
    (N x D features of the checkpoint's hidden size, the prompt embedded by a table of
    the checkpoint's vocabulary size) at the budget and at K = N - 1."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from par_vllm.dispatch import reduce_per_image
    from par_vllm.prompt import QueryRewriter
    from par_vllm.reduction import FULL_MATRIX_MAX

    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_token = tokenizer.convert_ids_to_tokens(getattr(config, "image_token_index", None) or config.image_token_id)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{image_token}\n{QUESTION}"}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt.replace(image_token, image_token * n_tokens))
    rewriter = QueryRewriter(tokenizer, image_token)
    if repeats is None:  # the tiled path takes seconds per image at the largest sizes
        repeats = 30 if n_tokens <= FULL_MATRIX_MAX else 3

    def median_seconds(fn) -> float:
        return timed_median(fn, repeats, device)

    hidden = config.text_config.hidden_size
    embed = torch.nn.Embedding(config.text_config.vocab_size, hidden).to(device)
    query_ids = torch.tensor(rewriter(prompt_ids), device=device)
    features = torch.randn(n_tokens, hidden, device=device)
    reduce_s = {}
    with torch.no_grad():
        for k in (budget, n_tokens - 1):
            settings = ParSettings(num_tokens=k)
            reduce_s[k] = median_seconds(lambda: reduce_per_image([features], [query_ids], [settings], embed))
    return {"repeats": repeats, "rewrite_s": median_seconds(lambda: rewriter(prompt_ids)),
            "reduce_s": reduce_s, "torch_threads": torch.get_num_threads(), "device": device}


def plot(runs, levels, series, path, about):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, _, _ in series:
        ttft = [statistics.median(r["ttft_p50"] for r in runs[(label, c)]) for c in levels]
        rps = [statistics.median(r["rps"] for r in runs[(label, c)]) for c in levels]
        left.plot(levels, ttft, marker="o", label=label)
        right.plot(levels, rps, marker="o", label=label)
    left.set(xlabel="concurrency", ylabel="TTFT p50 (s)", title="Time to first token", yscale="log")
    right.set(xlabel="concurrency", ylabel="requests / s", title="Throughput")
    right.legend(fontsize=8)
    fig.suptitle(about, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
