"""`par-vllm`: serve a LLaVA checkpoint with PAR, build the demo model, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from . import FAMILIES, par_architecture
from .server import par_engine_args, par_overrides
from .settings import CHOICES, FIELD_TYPES, GROUPS, PREFIX, ParSettingError, ParSettings, extra

# Environment the server reads that decides what it exposes (docs/operating.md);
# `serve --dry-run` shows those that are set.
EXPOSURE_ENV = ("VLLM_MEDIA_CONNECTOR", "VLLM_MEDIA_URL_ALLOW_REDIRECTS", "VLLM_MAX_IMAGE_PIXELS",
                "PAR_MAX_REQUEST_BYTES", "PROMETHEUS_MULTIPROC_DIR", "VLLM_PLUGINS")
# PAR_* variables that are not settings: the Docker entrypoint's (docs/operating.md).
DEPLOY_ENV = ("PAR_TRUST_REQUEST_SETTINGS", "PAR_ALLOWED_MEDIA_DOMAINS", "PAR_MAX_IMAGES_PER_REQUEST",
              "PAR_MAX_VIDEOS_PER_REQUEST", "PAR_MAX_REQUEST_BYTES", "PAR_ARCHITECTURE")


def env_name(name: str) -> str:
    return PREFIX.upper() + name.upper()


def flag_names(name: str) -> list[str]:
    """A setting's serve flags: --name-with-dashes, and for a boolean the flag that sets it
    false (its declared off_flag, or --no-name)."""
    dashed = "--" + name.replace("_", "-")
    if FIELD_TYPES[name] is bool:
        return [dashed, "--" + (extra(name)["off_flag"] or "no-" + name.replace("_", "-"))]
    return [dashed]


def _parse(name: str, text: str) -> object:
    """A flag's or variable's text as the setting's type (validation is the settings' own)."""
    kind = FIELD_TYPES[name]
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false"):
            raise ParSettingError(f"{PREFIX}{name}: expected 1/0/true/false, got {text!r}", setting=PREFIX + name)
        return text.lower() in ("1", "true")
    try:
        return int(text) if kind is int else float(text) if kind is float else text
    except ValueError:
        raise ParSettingError(f"{PREFIX}{name}: expected a number, got {text!r}", setting=PREFIX + name) from None


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (two for a boolean), from the declarations in par_vllm.settings."""
    for name, field in ParSettings.model_fields.items():
        text = field.description
        if extra(name)["experimental"]:
            text += f" Experimental: {extra(name)['experimental']} (docs/settings.md)."
        flags = flag_names(name)
        if FIELD_TYPES[name] is bool:
            on, off = flags
            parser.add_argument(on, dest=name, action="store_true", default=None,
                                help=text + f" (environment: {env_name(name)}=1)")
            parser.add_argument(off, dest=name, action="store_false", default=None,
                                help=f"set {PREFIX}{name} to false ({env_name(name)}=0)")
        else:
            parser.add_argument(flags[0], dest=name, metavar=None if name in CHOICES else name.upper(), default=None,
                                choices=CHOICES.get(name), help=f"{text} (environment: {env_name(name)})")


def setting_keys(args: argparse.Namespace, environ: dict[str, str] | None = None
                 ) -> tuple[dict[str, object], ParSettings]:
    """The `par_*` keys the user gave as `PAR_*` variables or flags (a flag wins), and the
    settings they make.

    Raises ParSettingError naming a bad one, so serve fails before vLLM starts."""
    keys = {}
    for key, text in (environ or {}).items():
        if not key.startswith(PREFIX.upper()) or key in DEPLOY_ENV:
            continue
        name = key[len(PREFIX):].lower()
        if name not in ParSettings.model_fields:
            raise ParSettingError(f"{key}: not a PAR setting's variable (settings: "
                                  f"{', '.join(env_name(n) for n in ParSettings.model_fields)})", setting=key)
        if text != "":
            keys[PREFIX + name] = _parse(name, text)
    for name in ParSettings.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            keys[PREFIX + name] = _parse(name, value) if isinstance(value, str) else value
    return keys, ParSettings.from_keys(keys)


def reference_markdown() -> str:
    """docs/settings.md: every setting, grouped, from the declarations above."""
    lines = ["# PAR settings", "",
             "Generated from `par_vllm/settings.py` by `par-vllm settings --markdown > docs/settings.md`.",
             "A server default is a `par_` key in `--hf-overrides`, a `par-vllm serve` flag, or a",
             "`PAR_*` variable of `par-vllm serve` and the Docker image; a request sets the same key",
             "in `mm_processor_kwargs` (with `--trust-request-mm-kwargs`; see docs/operating.md).", ""]
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| key | default | flag / variable | meaning |", "| --- | --- | --- | --- |"]
        for name, field in ParSettings.model_fields.items():
            if extra(name)["group"] != group:
                continue
            kind = FIELD_TYPES[name]
            choices = " (" + " \\| ".join(f"`{c}`" for c in kind) + ")" if name in CHOICES else ""
            default = "none" if field.default is None else f"`{json.dumps(ParSettings().to_keys()[PREFIX + name])}`"
            note = f" **Experimental** ({extra(name)['experimental']}): see below." if extra(name)["experimental"] else ""
            flags = " ".join(f"`{flag}`" for flag in flag_names(name))
            lines.append(f"| `{PREFIX}{name}` | {default} | {flags} `{env_name(name)}` | "
                         f"{field.description}{choices}{note} |")
        lines.append("")
    lines += ["## Experimental", "",
              "Off by default, not recommended: on the accuracy benchmark's model (trained here,",
              "docs/accuracy.md) neither measurably gained anything over the defaults.", "",
              "- `par_centre_relevance` 0.5, 1 and 2: on 300 training-split questions, between 2 answers",
              "  fewer and 1 more than the default at 25 / 11 / 6% of the tokens, measured before",
              "  `par_min_retrieved=2` became the default",
              "  (`benchmarks/results/par-ablation-vqa-v4-train-seed1-variants.txt`, rows cr05, cr1, cr2).",
              "- `par_centres=farthest_point`: on the same 300 questions, 298 / 298 / 292 right against the",
              "  default's 298 / 295 / 291 at 25 / 11 / 6% (3 and 1 answers ahead, p 0.25 and 1.0)",
              "  (`benchmarks/results/par-ablation-vqa-v4-train-seed1-min-retrieved-fps.txt`).",
              ""]
    return "\n".join(lines)


def checkpoint_architectures(model: str) -> list[str]:
    """The `architectures` of a checkpoint's config: a local directory's config.json, or
    through transformers (its cache, or the hub)."""
    config = Path(model) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("architectures") or []
    try:
        from transformers import AutoConfig

        return list(AutoConfig.from_pretrained(model).architectures or [])
    except Exception as error:  # noqa: BLE001 - any failure means: ask the user
        raise ValueError(f"cannot read {model}'s config to choose the PAR class ({type(error).__name__}); "
                         "pass --architecture with the checkpoint's own architecture") from None


def serve_command(
    args: argparse.Namespace, keys: dict[str, object], vllm_args: list[str]
) -> tuple[list[str], dict]:
    architecture = par_architecture([args.architecture] if args.architecture else
                                    checkpoint_architectures(args.model))
    overrides = {**par_overrides(architecture=architecture), **keys}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", args.model, "--hf-overrides", json.dumps(overrides), *par_engine_args(architecture),
               *vllm_args]
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
        help="run vLLM's OpenAI server on a checkpoint with PAR",
        description="Start vLLM's OpenAI-compatible server with PAR. Flags below set the "
                    "server's PAR defaults; every other argument goes to vLLM unchanged. "
                    "Requests can override a default with the same `par_*` key in "
                    "mm_processor_kwargs if vLLM runs with --trust-request-mm-kwargs.",
    )
    serve.add_argument("model", help="checkpoint directory or name, unmodified, of a supported family "
                       "(LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, Qwen3.5: --architecture lists them)")
    add_setting_flags(serve)
    serve.add_argument("--architecture", help="the checkpoint's architecture, when its config cannot be "
                       f"read here (default: from the config; supported: {', '.join(FAMILIES)})")
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

    reference = commands.add_parser("settings", help="list PAR's settings (docs/settings.md)")
    reference.add_argument("--markdown", action="store_true", help="the reference as Markdown")

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
            keys, settings = setting_keys(args, dict(os.environ) if args.command == "serve" else None)
        except ParSettingError as error:
            parser.exit(2, f"par-vllm {args.command}: {error}\n")
    if args.command == "serve":
        try:
            command, env = serve_command(args, keys, rest)
        except ValueError as error:
            parser.exit(2, f"par-vllm serve: {error}\n")
        if args.dry_run:
            print(shlex.join([f"{name}={env[name]}" for name in EXPOSURE_ENV if name in env] + command))
            return
        os.execve(command[0], command, env)
    elif args.command == "explain":
        from .explain import explain as run_explain

        print(run_explain(args.model, args.image, args.prompt, args.out, settings))
    elif args.command == "settings":
        if args.markdown:
            print(reference_markdown())
        else:
            for key, value in ParSettings().to_keys().items():
                print(f"{key} = {json.dumps(value)}")
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
