"""Start and stop a real vLLM OpenAI server with PAR on 127.0.0.1 (demo, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import ARCHITECTURE, PLACES_ROWS, WORKER_CLS
from .positions import ROPE_OVERRIDES

# What vLLM needs on a machine without a GPU (VLLM_NOTES.md); harmless elsewhere.
CPU_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
# Small, deterministic engine settings for a CPU: float32 matches transformers exactly.
CPU_ENGINE_ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
                   "--max-num-seqs", "4"]


def par_engine_args(architecture: str) -> list[str]:
    """vLLM flags a PAR architecture needs besides --hf-overrides: the plugin's worker for
    the families whose kept tokens it places (par_vllm/worker.py)."""
    return ["--worker-cls", WORKER_CLS] if architecture in PLACES_ROWS else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def par_overrides(par: bool = True, architecture: str = ARCHITECTURE, **settings: object) -> dict:
    """The --hf-overrides JSON: the PAR architecture, the positions switch that
    `par_positions="span"` needs on 1-D RoPE models (Qwen-VL's checkpoints have their own
    M-RoPE, never overridden), and `par_*` server defaults."""
    overrides: dict = {"architectures": [architecture]} if par else {}
    if par and architecture not in PLACES_ROWS:
        overrides.update(ROPE_OVERRIDES)
    overrides.update({f"par_{k}": v for k, v in settings.items()})
    return overrides


class VllmServer:
    """`with VllmServer(model, ...) as server:` runs vLLM's own OpenAI server
    (`python -m vllm.entrypoints.openai.api_server`, which also works with the
    `vllm-cpu` distribution) until the block ends."""

    def __init__(
        self,
        model: str | Path,
        *,
        hf_overrides: dict | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        log_path: str | Path | None = None,
    ):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "par-demo",
            "--host", "127.0.0.1", "--port", str(self.port),
            *(["--hf-overrides", json.dumps(hf_overrides)] if hf_overrides else []),
            *(extra_args if extra_args is not None else CPU_ENGINE_ARGS),
        ]
        self.env = {**CPU_ENV, **os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited during start-up:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=30) as response:
            return response.read().decode()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The server's engine core is a child process: end the whole process group.
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
