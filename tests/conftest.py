import os

from par_vllm.server import CPU_ENV

# Before anything imports vLLM: loopback-only engine, offline hub, small KV cache.
for key, value in CPU_ENV.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The random-weight demo LLaVA (576 visual tokens per image), built once per session."""
    from par_vllm.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("models") / "par-demo")


@pytest.fixture(scope="session")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)
