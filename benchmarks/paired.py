"""Question by question, two par_ablation.py result files on the same questions: for every
row both have, the answers only the first got right against those only the second got
right, and the exact McNemar p-value.

    .venv/bin/python benchmarks/paired.py benchmarks/results/par-ablation-vqa-v4-span-400.json \
        benchmarks/results/par-ablation-vqa-v4-centred-400.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from par_ablation import discordant, mcnemar  # noqa: E402


def paired_rows(first: dict, second: dict) -> list[str]:
    lines = [f"{'row':<24}{'first':>7}{'second':>8}{'only first':>12}{'only second':>13}{'p':>8}"]
    for key, answers in first["correct"].items():
        if key in second["correct"]:
            # Each file keeps a row's answers as a string of 1 (right) and 0 (wrong).
            only_first, only_second = discordant(list(map(int, answers)), list(map(int, second["correct"][key])))
            lines.append(f"{key:<24}{answers.count('1'):>7}{second['correct'][key].count('1'):>8}"
                         f"{only_first:>12}{only_second:>13}{mcnemar(only_first, only_second):>8.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    first, second = (json.loads(path.read_text()) for path in (args.first, args.second))
    for data, path in ((first, args.first), (second, args.second)):
        if "correct" not in data:
            parser.error(f"{path} has no per-question answers (written before par_ablation.py kept them)")
    if (first["split"], first["seed"], first["count"]) != (second["split"], second["seed"], second["count"]):
        parser.error("the two files were measured on different questions (split, seed or count differ)")
    print("\n".join(paired_rows(first, second)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
