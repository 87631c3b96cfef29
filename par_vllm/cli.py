"""`par-vllm`: serve a LLaVA checkpoint with PAR, build the demo model, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .config import CHOICES, ParSettingError, ParSettings
from .server import par_overrides

# One flag per PAR setting (the `par_*` key is the flag's name with underscores).
SETTING_FLAGS = {
    "keep_ratio": (float, "share of each image's visual tokens to keep: K = ceil(N x ratio), "
                          "at least 1 (default 0.111: 64 of LLaVA-1.5's 576)"),
    "num_tokens": (int, "explicit K per image; wins over --keep-ratio; clamped to N"),
    "outlier_factor": (float, "semantic retrieval keeps tokens whose prompt relevance exceeds "
                              "Q3 + factor x IQR (default 1.5)"),
    "retrieval_share": (float, "most of K that retrieved tokens may take; clustering gets the "
                               "rest (default 0.5)"),
    "min_retrieved": (int, "retrieval takes at least this many of the most relevant tokens, "
                           "outliers or not, within the same cap (default 2; 0 is the paper's rule)"),
    "duplicate_threshold": (float, "similarity above which a token merges into a retrieved token "
                                   "instead of competing for a centre (default 0.9)"),
    "relevance": (str, "reduce a token's similarity to the prompt's words by 'max' or 'mean'"),
    "knn_k": (int, "neighbours in the kNN graph that ranks cluster centres (default 5)"),
    "centres": (str, "how non-retrieved tokens are covered: 'density_peaks' (DPC-KNN) or "
                     "'farthest_point' (max-min distance to everything kept)"),
    "centre_relevance": (float, "power of the prompt relevance (rescaled to [0, 1]) that multiplies "
                                "each cluster centre's score; 0 = prompt-agnostic centres"),
    "similarity": (str, "how visual tokens are compared with each other: 'centred' (cosine after "
                        "subtracting the image's mean token; default) or 'cosine'"),
    "routing": (str, "'separate' (retrieved tokens take in only their near-duplicates, the rest "
                     "go to cluster centres; default) or 'nearest' (any token to its nearest kept one)"),
    "positions": (str, "'span' (an image's kept tokens spread over the positions the whole image "
                       "takes; default) or 'consecutive' (K positions)"),
    "backend": (str, "'auto' (Triton kernels on GPU, torch elsewhere), 'torch' or 'triton'; a server "
                     "setting: requests cannot change it"),
    "allowed_request_kwargs": (str, "comma-separated mm_processor_kwargs keys other than PAR's that "
                                    "requests may send to the image processor (default: none; "
                                    "a request with any other key gets a 400)"),
}
# Environment the server reads that decides what it exposes (docs/operating.md);
# `serve --dry-run` shows those that are set.
EXPOSURE_ENV = ("VLLM_MEDIA_CONNECTOR", "VLLM_MEDIA_URL_ALLOW_REDIRECTS", "VLLM_MAX_IMAGE_PIXELS",
                "PAR_MAX_REQUEST_BYTES", "PROMETHEUS_MULTIPROC_DIR", "VLLM_PLUGINS")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, (kind, text) in SETTING_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    parser.add_argument("--keep-question-type-words", action="store_true",
                        help="score the image against every content word of the prompt, 'color' "
                             "and 'shape' in 'what color is the shape?' included "
                             "(par_drop_question_type_words=false)")


def setting_keys(args: argparse.Namespace) -> tuple[dict[str, object], ParSettings]:
    """The `par_*` keys the user gave as flags, and the settings they make.

    Raises ParSettingError naming a bad one, so serve fails before vLLM starts."""
    keys = {f"par_{name}": getattr(args, name) for name in [*SETTING_FLAGS, "method"]
            if getattr(args, name, None) is not None}
    if getattr(args, "disable", False):
        keys["par_enabled"] = False
    if getattr(args, "keep_question_type_words", False):
        keys["par_drop_question_type_words"] = False
    return keys, ParSettings.from_keys(keys)


def serve_command(
    args: argparse.Namespace, keys: dict[str, object], vllm_args: list[str]
) -> tuple[list[str], dict]:
    overrides = {**par_overrides(), **keys}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", args.model, "--hf-overrides", json.dumps(overrides), *vllm_args]
    env = dict(os.environ)
    if args.par_api:
        names = [n for n in env.get("VLLM_PLUGINS", "").split(",") if n]
        env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*names, "par_vllm", "par_vllm_api"]))
    return command, env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="par-vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run vLLM's OpenAI server on a LLaVA checkpoint with PAR",
        description="Start vLLM's OpenAI-compatible server with PAR. Flags below set the "
                    "server's PAR defaults; every other argument goes to vLLM unchanged. "
                    "Requests can override a default with the same `par_*` key in "
                    "mm_processor_kwargs if vLLM runs with --trust-request-mm-kwargs.",
    )
    serve.add_argument("model", help="checkpoint directory or name (an unmodified LLaVA)")
    add_setting_flags(serve)
    serve.add_argument("--disable", action="store_true",
                       help="serve every image whole by default (par_enabled=false)")
    serve.add_argument("--par-api", action="store_true",
                       help="also expose GET /v1/par/config (sets VLLM_PLUGINS)")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command, do not run it")

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

    explain = commands.add_parser(
        "explain",
        help="draw which patches PAR keeps, and which it merges into which, as a PNG",
    )
    explain.add_argument("image", type=Path)
    explain.add_argument("prompt")
    explain.add_argument("--model", type=Path, default=Path(".models/par-demo"))
    explain.add_argument("--out", type=Path, default=Path("kept.png"))
    add_setting_flags(explain)
    explain.add_argument("--method", choices=CHOICES["method"],
                         help="PAR or a baseline at the same budget")

    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare "--" belongs to vLLM, even flags that look like ours.
    vllm_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args, rest = parser.parse_known_args(argv)
    rest += vllm_args
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("serve", "explain"):
        try:
            keys, settings = setting_keys(args)
        except ParSettingError as error:
            parser.exit(2, f"par-vllm {args.command}: {error}\n")
    if args.command == "serve":
        command, env = serve_command(args, keys, rest)
        if args.dry_run:
            print(shlex.join([f"{name}={env[name]}" for name in EXPOSURE_ENV if name in env] + command))
            return
        os.execve(command[0], command, env)
    elif args.command == "explain":
        from .explain import explain as run_explain

        print(run_explain(args.model, args.image, args.prompt, args.out, settings))
    elif args.command == "make-demo-model":
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
