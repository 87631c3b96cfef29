"""What the prompt rewrite costs per request: from a chat prompt's token ids to the query
ids PAR scores the image against (`par_vllm.prompt.QueryRewriter`: decode, find the user
turns, drop function words, segment Chinese and Japanese, encode), in each language it
covers and for long conversations (and under `par_query_turn="image_and_latest"`, which
also finds where each later question's view goes, for as many views as the image's
budget takes: N // K of them, N given by `--image-tokens`).

    python -m benchmarks.rewrite_cost [--model DIR]
`--model`: a checkpoint whose tokenizer and chat template to use (default: the tiny demo
model's, built here). Writes benchmarks/results/rewrite-cost-cpu.{txt,json}.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results

RESULTS = Path(__file__).parent / "results"

QUESTIONS = {
    "English": "What color is the triangle on the left? Answer with one word.",
    "Spanish": "¿De qué color es el triángulo de la izquierda? Responde con una palabra.",
    "French": "De quelle couleur est le triangle à gauche dans l'image ? Réponds en un mot.",
    "German": "Welche Farbe hat das Dreieck links auf dem Bild? Antworte mit einem Wort.",
    "Chinese": "左边的三角形是什么颜色？请用一个词回答。",
    "Japanese": "左にある三角形は何色ですか？一言で答えてください。",
    "Russian (kept whole)": "Какого цвета треугольник слева? Ответьте одним словом.",
}
SYSTEM = ("You are a careful visual assistant. Look at the whole image before you answer, say "
          "when you are unsure, and keep answers short unless the user asks for detail.")


def conversation(turns: int, image_token: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in range(turns):
        question = QUESTIONS["English"] if turn == 0 else f"And what about the shape in corner number {turn}?"
        messages.append({"role": "user", "content": f"{image_token}\n{question}" if turn == 0 else question})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": "It is a red triangle, next to a blue circle."})
    return messages


def remember_as_before(rewriter, rewrite, previous) -> None:
    """Forget every turn read, then read `previous` (the conversation's previous request,
    None for none) as the server would have."""
    rewriter.forget()
    if previous is not None:
        rewrite(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint whose tokenizer to use")
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--image-tokens", type=int, default=144,
                        help="N of the conversation's image, which bounds its views (default: the accuracy models')")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from par_vllm.demo_model import IMAGE_TOKEN, make_demo_model
    from par_vllm.prompt import QueryRewriter
    from par_vllm.settings import ParSettings

    if args.model:
        model, model_words = args.model, str(args.model)
    else:
        model, model_words = Path(make_demo_model(tempfile.mkdtemp())), "the tiny demo model (tokenizer built here)"
    tokenizer = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    rewriter = QueryRewriter(tokenizer, IMAGE_TOKEN)
    set_up = time.perf_counter() - start

    cases = {f"{name}, one turn": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}] for name, q in QUESTIONS.items()}
    cases |= {f"English, system prompt + {n} turns": conversation(n, IMAGE_TOKEN) for n in (4, 16)}
    # Worst cases for the segmenters: one long run of the same unknown character.
    cases |= {f"{name}, 20,000 x {char}": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{char * 20000}"}]
              for name, char in (("Chinese", "三"), ("Japanese", "あ"))}
    # What the processor does per request under each rule: the default rewrite, and under
    # par_query_turn="image_and_latest" the image turns' query and every later turn's second
    # view in one call. The rewriter remembers the words of turns it has read (each request
    # of a conversation sends the earlier turns again); every row is timed with nothing
    # remembered, as for a prompt never seen, and image_and_latest, which reads every later
    # turn, also with the earlier turns remembered, as for a conversation's next request.
    # The processor takes views while the image's budget (its N tokens) has room for
    # another K, and the turns after the last one taken are not read.
    rules = {name: (rewriter, True) for name in cases}

    def views_taken(keep_ratio):
        most = args.image_tokens // ParSettings(keep_ratio=keep_ratio).num_kept(args.image_tokens)

        def last_view(ids):
            views = rewriter.rewrite(ids, turn="image_and_latest").second_views
            return list(itertools.islice(views, most))[-1].query
        return last_view, most

    for n, ratios in ((4, (0.111,)), (16, (0.111, 0.06))):
        name = f"English, system prompt + {n} turns"
        for ratio in ratios:
            rule, most = views_taken(ratio)
            for forget, label in ((True, "nothing remembered"), (False, "earlier turns remembered")):
                row = f"{name}, image_and_latest at {ratio:.0%} ({min(most, n - 1)} views), {label}"
                cases[row] = cases[name]
                rules[row] = (rule, forget)
    rows = []
    for name, messages in cases.items():
        ids, previous = (tokenizer.encode(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                                          add_special_tokens=False) if m else [] for m in (messages, messages[:-2]))
        long = len(ids) > 5000
        rewrite, forget = rules[name]

        for _ in range(1 if long else 20):
            remember_as_before(rewriter, rewrite, previous if not forget else None)
            query = rewrite(ids)
        times = []
        for _ in range(5 if long else args.repeats):
            remember_as_before(rewriter, rewrite, previous if not forget else None)
            begin = time.perf_counter()
            rewrite(ids)
            times.append(time.perf_counter() - begin)
        times.sort()
        rows.append({"prompt": name, "prompt_tokens": len(ids), "runs": len(times),
                     "query": tokenizer.decode(query).strip()[:40],
                     "median_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * times[int(0.99 * len(times))]})

    where = f"{platform.processor() or platform.machine()}, one thread of Python"
    lines = [f"Prompt rewrite per request (QueryRewriter), {model_words}; {where}; {args.repeats} runs each "
             "(5 for the 20,000-character prompts); query: its first 40 characters (image_and_latest: the "
             f"last view's the processor takes for a {args.image_tokens}-token image at that keep ratio).",
             f"Set-up once per server (stop lists, jieba's dictionary): {set_up:.2f} s.",
             "", f"{'prompt':<96} {'tokens':>6} {'median ms':>10} {'p99 ms':>8}  query"]
    for row in rows:
        lines.append(f"{row['prompt']:<96} {row['prompt_tokens']:>6} {row['median_ms']:>10.3f} {row['p99_ms']:>8.3f}  "
                     f"{row['query']}")
    text = "\n".join(lines)
    print(text)
    write_results(args.out / "rewrite-cost-cpu", text, {"model": model_words, "set_up_seconds": set_up, "rows": rows})


if __name__ == "__main__":
    main()
