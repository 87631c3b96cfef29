"""The benchmark scripts stay runnable (they are measured on other machines)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import flops
from benchmarks.common import parse_variant

ROOT = Path(__file__).parents[1]


def test_flops_model_counts_what_reduction_removes():
    decoder = flops.MODELS[0].decoder
    assert decoder.prefill(640) > decoder.prefill(104) > 0
    # Linear terms dominate at these lengths: about 7B params x 2 FLOPs per token.
    assert 12e9 < decoder.prefill(1) < 15e9
    no_reduction = flops.table(40, 1.0)[0]
    assert abs(no_reduction["llm_reduction_pct"]) < 1e-9
    assert no_reduction["total_reduction_pct"] < 0  # PAR's own cost, nothing saved


def test_kernel_benchmark_smoke_runs():
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rel tri" in result.stdout and "smoke" in result.stdout
    assert "same kept" in result.stdout  # the kernels against the reference, at each shape


def test_serve_benchmark_times_pars_own_work(demo_model):
    from benchmarks import serve

    work = serve.par_own_work(demo_model, 576, 64, "cpu", repeats=2)
    assert work["rewrite_s"] > 0 and set(work["reduce_s"]) == {64, 575}
    assert all(0 < s < 5 for s in work["reduce_s"].values())


def test_par_cost_benchmark_measures_each_size_in_its_own_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.par_cost", "--sizes", "64", "256", "--dim", "16",
                             "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "par-cost-cpu.json").read_text())["rows"]
    assert [(r["num_visual"], r["kept"]) for r in rows] == [(64, 8), (256, 29)]  # K = ceil(0.111 N)
    assert all(r["seconds"] > 0 and r["peak_extra_bytes"] >= 0 for r in rows)
    # At D = 16 the pairwise N x N similarities dominate what is alive at once: at least
    # one float32 matrix, and growing with N.
    assert all(r["peak_tensor_bytes"] >= 4 * r["num_visual"] ** 2 for r in rows)
    assert rows[1]["peak_tensor_bytes"] > rows[0]["peak_tensor_bytes"]


def test_par_cost_counts_tensors_alive_at_once():
    import torch

    from benchmarks.par_cost import peak_tensor_bytes

    def run():
        first = torch.ones(1000, 1000)    # 4 MB
        second = first * 2                # 8 MB alive
        del first
        third = second + 1                # 8 MB again: first was freed
        return third.sum()

    assert peak_tensor_bytes(run) == pytest.approx(8_000_000, abs=64)


def test_serve_benchmark_counts_qwen_tokens_per_size_and_times_its_own_work(tmp_path):
    from benchmarks import serve
    from par_vllm.demo_qwen import make_demo_qwen_model

    model = make_demo_qwen_model(tmp_path / "qwen")
    about = json.loads((model / "par_model.json").read_text())
    assert [serve.visual_tokens(model, about, size) for size in (448, 896)] == [256, 1024]
    work = serve.par_own_work(model, 256, 29, "cpu", repeats=2)
    assert work["rewrite_s"] > 0 and set(work["reduce_s"]) == {29, 255}
    # Room for the largest image's prompt; past the checkpoint's positions only where it must, and said.
    positions = json.loads((model / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert serve.engine_room(model, 1024) == (["--max-model-len", "4096", "--max-num-batched-tokens", "4096"], {}, "")
    flags, env, note = serve.engine_room(model, positions)
    assert flags[1] == flags[3] == str(positions + 512) and env == {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    assert str(positions) in note


def test_video_benchmark_counts_a_clips_tokens_and_sends_it_as_mp4(tmp_path):
    """A clip's grid from the checkpoint's processor (N and what EVS keeps at least follow
    from it), PAR's and EVS's selection timed on it, and each request's clip an MP4 that
    OpenCV reads back frame for frame."""
    import base64

    import cv2

    from benchmarks import serve_video
    from par_vllm.demo_qwen import make_demo_qwen_model

    model = make_demo_qwen_model(tmp_path / "qwen")
    assert serve_video.video_grid(model, 32, 336) == (16, 24, 24)
    timed = serve_video.selection_seconds(model, (2, 8, 8), 20, "cpu", repeats=2)
    assert timed["par_s"] > 0 and timed["evs_s"] > 0 and "clip_s" not in timed
    # With a clip of that grid: PAR and a variant on its own tokens.
    clip = (serve_video.clip_frames(0, 4, 112), serve_video.clip_metadata(4))
    variant = parse_variant("unmerged:merge_repeats=false")
    timed = serve_video.selection_seconds(model, (2, 8, 8), 6, "cpu", repeats=2, clip=clip, variants=(variant,))
    assert set(timed["clip_s"]) == {"PAR", "unmerged"} and min(timed["clip_s"].values()) > 0
    url = serve_video.video_part(6, 112)(3)["video_url"]["url"]
    (tmp_path / "clip.mp4").write_bytes(base64.b64decode(url.split(",", 1)[1]))
    reader = cv2.VideoCapture(str(tmp_path / "clip.mp4"))
    assert int(reader.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    frames = serve_video.clip_frames(3, 6, 112)
    assert not (frames[0] == frames[-1]).all() and (frames[0] == serve_video.clip_frames(3, 6, 112)[0]).all()


def test_serve_profile_attributes_samples_to_the_innermost_process_and_named_stages():
    """py-spy's raw stacks nest each child process under its parent: a sample belongs to the
    innermost one, and counts in a stage when the stage's function is anywhere on its stack."""
    from collections import Counter

    from benchmarks.diagnostics.serve_profile import tally

    root = 'process 10:"python -m vllm.entrypoints.openai.api_server --model m"'
    core = 'process 11:"VLLM::EngineCore"'
    worker = 'process 12:"VLLM::Worker"'
    stacks = Counter({
        f"{root};<module> (api_server.py);BaseMultiModalProcessor._cached_apply_hf_processor (processing.py)": 3,
        f"{root};{core};SpinCondition.wait (shm.py)": 5,
        f"{root};{core};{worker};GPUModelRunner.execute_model (runner.py);"
        "Qwen2_5_VLForConditionalGeneration._process_video_input (qwen2_5_vl.py)": 7,
        f"{root};{core};{worker};GPUModelRunner.execute_model (runner.py);ParQwenModel._reduce (qwen_vl.py);"
        "reduce_per_image (dispatch.py);ParQwenModel._reduce (qwen_vl.py)": 2,
    })
    counts = tally(stacks)
    assert counts["processes"] == {"API server (processor, HTTP)": 3, "engine core (scheduler)": 5,
                                   "worker (model executor)": 9}
    assert counts["stages"]["multimodal processor (apply)"] == 3
    assert counts["stages"]["vision tower"] == 7
    assert counts["stages"]["model forward (execute_model)"] == 9
    # A function twice on one stack counts once.
    assert counts["stages"]["PAR or EVS, with positions (_reduce)"] == 2
    assert counts["functions"]["ParQwenModel._reduce"] == 2 and counts["functions"]["reduce_per_image"] == 2


def test_multiturn_compares_every_two_par_servers_on_later_turns():
    from benchmarks.multiturn import later_turns_right, paired_lines

    def conversation(*turns):
        return [{"correct": ok} for ok in turns]

    results = {"stock vLLM": [conversation(True, True, True, True)],
               "PAR, latest": [conversation(False, True, True, True), conversation(True, True, True, False)],
               "PAR, image": [conversation(True, False, False, True), conversation(True, True, False, False)]}
    right = {name: later_turns_right(r) for name, r in results.items()}
    assert right["PAR, latest"] == [True, True, True, True, True, False]  # turn 1 left out
    lines = paired_lines(right)
    assert lines[1:] == ["  PAR, latest against PAR, image: 3:0, p 0.250"]


def test_rewrite_cost_takes_the_views_the_images_budget_allows(tmp_path):
    # A 144-token image takes 9 views at 11% (K = 16) and 16 at 6% (K = 9): of a 16-turn
    # conversation's 15 later turns, the 9th is the last one read at 11%, all at 6%.
    result = subprocess.run([sys.executable, "-m", "benchmarks.rewrite_cost", "--repeats", "2", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["prompt"]: r for r in json.loads((tmp_path / "rewrite-cost-cpu.json").read_text())["rows"]}
    for remembered in ("nothing remembered", "earlier turns remembered"):
        at = "English, system prompt + {} turns, image_and_latest at {} views), " + remembered
        assert rows[at.format(16, "11% (9")]["query"] == "corner 9"
        assert rows[at.format(16, "6% (15")]["query"] == "corner 15"
        assert rows[at.format(4, "11% (3")]["query"] == "corner 3"
    assert all(r["median_ms"] > 0 for r in rows.values())
