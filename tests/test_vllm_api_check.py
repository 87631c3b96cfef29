"""scripts/check_vllm_api.py, which checks par_vllm against another vLLM release's source
(the GPU build the Dockerfile serves with), finds what it says it finds: here against
wheels built from the vLLM installed here, unchanged and with one change of each kind."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
EDITS = {
    "vllm/multimodal/processing/processor.py": ("def _call_hf_processor(\n        self,",
                                                "def _call_hf_processor(\n        self,\n        extra,"),
    "vllm/multimodal/parse.py": ("class ImageProcessorItems(", "class RenamedImageProcessorItems("),
}


def wheel(path: Path, edits: dict) -> Path:
    import vllm

    site = Path(vllm.__file__).parents[1]
    with zipfile.ZipFile(path, "w") as archive:
        for source in (site / "vllm").rglob("*.py"):
            name = source.relative_to(site).as_posix()
            text = source.read_text(errors="replace")
            if name in edits:
                old, new = edits[name]
                assert old in text, f"{name} no longer has {old!r}: update this test"
                text = text.replace(old, new, 1)
            archive.writestr(name, text)
    return path


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/check_vllm_api.py", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_same_source_passes(tmp_path):
    result = check(wheel(tmp_path / "vllm-0.0.1-py3-none-any.whl", {}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "modules whose source differs: none" in result.stdout


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_missing_name_or_a_changed_signature_fails(tmp_path, edit):
    result = check(wheel(tmp_path / "vllm-0.0.2-py3-none-any.whl", {edit: EDITS[edit]}))
    assert result.returncode == 1, result.stdout + result.stderr
    expected = ("BaseMultiModalProcessor._call_hf_processor: ['self', 'hf_data', 'hf_kwargs'] here, "
                "['self', 'extra', 'hf_data', 'hf_kwargs'] there" if "processor" in edit
                else "vllm.multimodal.parse.ImageProcessorItems: missing")
    assert expected in result.stdout
