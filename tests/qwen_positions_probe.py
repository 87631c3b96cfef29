"""Serve prompts through a real vLLM engine with a PAR Qwen-VL class and report, per
request, the positions the engine's model runner holds for the prompt once every row has
reached the language model, and which tokens PAR kept in each image and video.

Run as a script (tests/test_qwen_vl.py does): the engine runs in this process so that the
runner's state can be read, away from pytest's. Also reports, per call of the model's
embed_multimodal, the N of the items in each run of the vision tower (none for items the
feature cache answered), and the first answer token's log-probabilities. Prints one JSON
line.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main():
    model, architecture, chunk, ratio, requests_path, dtype, cache_mb = sys.argv[1:8]
    import numpy as np
    from vllm import LLM, SamplingParams
    from PIL import Image

    from par_vllm.models import qwen_vl
    from par_vllm.server import par_overrides

    kept_log, positions_log = [], []
    reduce = qwen_vl.reduce_per_image

    def recording_reduce(*args, **kwargs):
        out = reduce(*args, **kwargs)
        kept_log.extend(kept.tolist() for _, kept in out)
        return out

    place = qwen_vl.ParQwenModel.recompute_mrope_positions

    def recording_place(self, *args, **kwargs):
        rows, positions, delta = place(self, *args, **kwargs)
        positions_log.append(positions.tolist())
        return rows, positions, delta

    tower_log = []
    embed, encode = qwen_vl.ParQwenModel.embed_multimodal, qwen_vl.ParQwenModel._encode

    def recording_embed(self, **kwargs):
        tower_log.append([])
        return embed(self, **kwargs)

    def recording_encode(self, modality, inputs, items):
        tower_log[-1].append((inputs[f"{modality}_grid_thw"][items].prod(-1) // 4).tolist())
        return encode(self, modality, inputs, items)

    qwen_vl.ParQwenModel.embed_multimodal = recording_embed
    qwen_vl.ParQwenModel._encode = recording_encode
    qwen_vl.reduce_per_image = recording_reduce
    qwen_vl.ParQwenModel.recompute_mrope_positions = recording_place
    llm = LLM(model, hf_overrides=par_overrides(architecture=architecture, keep_ratio=float(ratio),
                                                feature_cache_mb=int(cache_mb)),
              worker_cls="par_vllm.worker.ParWorker", distributed_executor_backend="uni",
              enforce_eager=True, dtype=dtype, max_model_len=4096, max_num_seqs=1,
              max_num_batched_tokens=int(chunk), limit_mm_per_prompt={"image": 2, "video": 1},
              enable_prefix_caching=False, seed=0)
    results = []
    for request in json.loads(open(requests_path).read()):
        kept_log.clear()
        positions_log.clear()
        tower_log.clear()
        data = {"image": [Image.open(path).convert("RGB") for path in request["images"]]} if request["images"] else {}
        if "video" in request:  # (frames saved with numpy, metadata)
            data["video"] = (np.load(request["video"]["frames"]), request["video"]["metadata"])
        prompt = {"prompt": request["prompt"], "multi_modal_data": data}
        if "mm_processor_kwargs" in request:
            prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
        (out,) = llm.generate(prompt,
                              SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)
        first = {token: lp.logprob for token, lp in out.outputs[0].logprobs[0].items()}
        results.append({"prompt_token_ids": list(out.prompt_token_ids), "kept": list(kept_log), "first": first,
                        "positions": positions_log[-1], "steps": len(positions_log),
                        "tower_runs": list(tower_log)})
    print("PROBE " + json.dumps(results))


if __name__ == "__main__":
    main()
