"""`par-vllm`: build the demo model, run the demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="par-vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser(
        "make-demo-model",
        help="build a small random-weight LLaVA (336 px, 576 visual tokens per image) offline",
    )
    make.add_argument("out_dir", type=Path)
    make.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser(
        "demo",
        help="serve the demo model with PAR and compare one request with and without it",
    )
    demo.add_argument("--model", type=Path, default=Path(".models/par-demo"),
                      help="model directory (built here first if it does not exist)")
    demo.add_argument("--keep-ratio", type=float, default=0.111)

    args = parser.parse_args(argv)
    if args.command == "make-demo-model":
        from .demo_model import make_demo_model

        print(make_demo_model(args.out_dir, seed=args.seed))
    elif args.command == "demo":
        from .demo import run_demo
        from .demo_model import make_demo_model

        if not (args.model / "config.json").exists():
            print(f"Building the demo model in {args.model} ...", flush=True)
            make_demo_model(args.model)
        run_demo(args.model, keep_ratio=args.keep_ratio)


if __name__ == "__main__":
    main()
