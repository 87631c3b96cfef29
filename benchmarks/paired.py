"""Question by question, two par_ablation.py result files on the same questions: for every
row both have, the answers only the first got right against those only the second got
right, and the exact McNemar p-value.

    .venv/bin/python benchmarks/paired.py benchmarks/results/par-ablation-vqa-v4-span-400.json \
        benchmarks/results/par-ablation-vqa-v4-centred-400.json

`--rows A B` compares row A of the first file with row B of the second at every budget
both have (e.g. `--rows prompt topk_prompt`: a new PAR default against the top-k rows of
an older file on the same questions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from par_ablation import discordant, mcnemar  # noqa: E402


def paired_rows(first: dict, second: dict, rows: tuple[str, str] | None = None) -> list[str]:
    """Rows of `first` against the same rows of `second`, or, with rows=(A, B), row A of
    `first` against row B of `second`, budget by budget."""
    lines = [f"{'row':<32}{'first':>7}{'second':>8}{'only first':>12}{'only second':>13}{'p':>8}"]
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
            lines.append(f"{label:<32}{answers.count('1'):>7}{theirs.count('1'):>8}"
                         f"{only_first:>12}{only_second:>13}{mcnemar(only_first, only_second):>8.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--rows", nargs=2, metavar=("A", "B"),
                        help="compare row A of the first file with row B of the second")
    args = parser.parse_args(argv)
    first, second = (json.loads(path.read_text()) for path in (args.first, args.second))
    for data, path in ((first, args.first), (second, args.second)):
        if "correct" not in data:
            parser.error(f"{path} has no per-question answers (written before par_ablation.py kept them)")
    if (first["split"], first["seed"], first["count"]) != (second["split"], second["seed"], second["count"]):
        parser.error("the two files were measured on different questions (split, seed or count differ)")
    lines = paired_rows(first, second, tuple(args.rows) if args.rows else None)
    if len(lines) == 1:
        parser.error("the two files have no row in common" + (f" ({args.rows[0]} / {args.rows[1]})" if args.rows else ""))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
