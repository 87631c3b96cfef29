"""Question by question, two result files on the same questions (par_ablation.py's, or
accuracy.py's and accuracy_video.py's, which answer through vLLM): for every
row both have, the answers only the first got right against those only the second got
right, and the exact McNemar p-value.

    .venv/bin/python -m benchmarks.diagnostics.paired benchmarks/results/par-ablation-vqa-v4-span-400.json \
        benchmarks/results/par-ablation-vqa-v4-centred-400.json

`--rows A B` compares row A of the first file with row B of the second at every budget
both have (e.g. `--rows prompt topk_prompt`: a new PAR default against the top-k rows of
an older file on the same questions). More pairs of files add up: the counts are summed
over every pair (each pair on its own questions) and the p-value is the sum's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import discordant, mcnemar


def paired_counts(first: dict, second: dict, rows: tuple[str, str] | None = None) -> dict[str, list[int]]:
    """Rows of `first` against the same rows of `second`, or, with rows=(A, B), row A of
    `first` against row B of `second`, budget by budget: label -> [right in first, right
    in second, only first right, only second right]."""
    counts = {}
    for key, answers in first["correct"].items():
        name, _, budget = key.partition("@")
        if rows is not None:
            if name != rows[0]:
                continue
            other = f"{rows[1]}@{budget}"
        else:
            other = key
        if other in second["correct"]:
            # Each file keeps a row's answers as a string of 1 (right) and 0 (wrong).
            theirs = second["correct"][other]
            only_first, only_second = discordant(list(map(int, answers)), list(map(int, theirs)))
            label = key if other == key else f"{key} / {rows[1]}"
            counts[label] = [answers.count("1"), theirs.count("1"), only_first, only_second]
    return counts


def paired_rows(first: dict, second: dict, rows: tuple[str, str] | None = None) -> list[str]:
    return table(paired_counts(first, second, rows))


def table(counts: dict[str, list[int]]) -> list[str]:
    lines = [f"{'row':<32}{'first':>7}{'second':>8}{'only first':>12}{'only second':>13}{'p':>8}"]
    for label, (right_first, right_second, only_first, only_second) in counts.items():
        lines.append(f"{label:<32}{right_first:>7}{right_second:>8}"
                     f"{only_first:>12}{only_second:>13}{mcnemar(only_first, only_second):>8.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FIRST SECOND",
                        help="one or more pairs of files; the counts of several pairs add up")
    parser.add_argument("--rows", nargs=2, metavar=("A", "B"),
                        help="compare row A of the first file with row B of the second")
    args = parser.parse_args(argv)
    if len(args.files) % 2:
        parser.error(f"{len(args.files)} files: give them in pairs (FIRST SECOND [FIRST SECOND ...])")
    total: dict[str, list[int]] = {}
    for first_path, second_path in zip(args.files[::2], args.files[1::2]):
        first, second = (json.loads(path.read_text()) for path in (first_path, second_path))
        for data, path in ((first, first_path), (second, second_path)):
            if "correct" not in data:
                parser.error(f"{path} has no per-question answers (written before the benchmarks kept them)")
            if not {"split", "seed", "count"} <= data.keys():
                parser.error(f"{path} does not say which questions it answered (split, seed, count)")
        if (first["split"], first["seed"], first["count"]) != (second["split"], second["seed"], second["count"]):
            parser.error(f"{first_path} and {second_path} were measured on different questions "
                         "(split, seed or count differ)")
        counts = paired_counts(first, second, tuple(args.rows) if args.rows else None)
        if not counts:
            parser.error(f"{first_path} and {second_path} have no row in common"
                         + (f" ({args.rows[0]} / {args.rows[1]})" if args.rows else ""))
        if total and set(counts) != set(total):
            parser.error(f"{first_path} and {second_path} do not have the rows of the pairs before them")
        for label, values in counts.items():
            total[label] = [a + b for a, b in zip(total.get(label, [0, 0, 0, 0]), values)]
    print("\n".join(table(total)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
