"""Serve prompts through a real vLLM engine with a PAR Qwen-VL class and report, per
request, the positions the engine's model runner holds for the prompt once every row has
reached the language model, and which tokens PAR kept in each image and video.

Run as a script (tests/test_qwen_vl.py does): the engine runs in this process so that the
runner's state can be read, away from pytest's. Also reports, per call of the model's
embed_multimodal, the N of the items in each run of the vision tower. Prints one JSON line.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main():
    model, architecture, chunk, ratio, requests_path, dtype = sys.argv[1:7]
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
    tower_groups = qwen_vl.ParQwenModel._tower_groups

    def recording_tower_groups(self, modality, inputs):
        groups = tower_groups(self, modality, inputs)
        sizes = [int(g.prod()) // 4 for g in inputs[f"{modality}_grid_thw"]]
        tower_log.append([sizes[group] for group in groups])
        return groups

    qwen_vl.ParQwenModel._tower_groups = recording_tower_groups
    qwen_vl.reduce_per_image = recording_reduce
    qwen_vl.ParQwenModel.recompute_mrope_positions = recording_place
    llm = LLM(model, hf_overrides=par_overrides(architecture=architecture, keep_ratio=float(ratio)),
              worker_cls="par_vllm.worker.ParWorker", distributed_executor_backend="uni",
              enforce_eager=True, dtype=dtype, max_model_len=4096, max_num_seqs=1,
              max_num_batched_tokens=int(chunk), limit_mm_per_prompt={"image": 2, "video": 1},
              enable_prefix_caching=False, seed=0)
    results = []
    for request in json.loads(open(requests_path).read()):
        kept_log.clear()
        positions_log.clear()
        tower_log.clear()
        data = {"image": [Image.open(path).convert("RGB") for path in request["images"]]}
        if "video" in request:  # (frames saved with numpy, metadata)
            data["video"] = (np.load(request["video"]["frames"]), request["video"]["metadata"])
        (out,) = llm.generate({"prompt": request["prompt"], "multi_modal_data": data},
                              SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        results.append({"prompt_token_ids": list(out.prompt_token_ids), "kept": list(kept_log),
                        "positions": positions_log[-1], "steps": len(positions_log),
                        "tower_runs": list(tower_log)})
    print("PROBE " + json.dumps(results))


if __name__ == "__main__":
    main()
