"""An offline vLLM engine (LLM.generate) for the engine tests: started, asked, shut down."""

import gc


def make_llm(model, overrides=None, max_model_len=2048, dtype="float32", limit_mm_per_prompt=None, **engine_args):
    from vllm import LLM

    return LLM(str(model), hf_overrides=overrides or {}, enforce_eager=True, dtype=dtype,
               max_model_len=max_model_len, max_num_seqs=4, limit_mm_per_prompt=limit_mm_per_prompt or {"image": 2},
               seed=0, **engine_args)


def close(llm) -> None:
    """Stop the engine's processes now: left to the interpreter's exit, vLLM's shutdown
    logs into streams pytest has already closed."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompt, images, mm_kwargs=None, max_tokens=6, logprobs=1):
    from vllm import SamplingParams

    request = {"prompt": prompt, "multi_modal_data": {"image": images}}
    if mm_kwargs is not None:
        request["mm_processor_kwargs"] = mm_kwargs
    (out,) = llm.generate(request, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  logprobs=logprobs), use_tqdm=False)
    return out


def text_tokens(tokenizer, prompt):
    """Prompt tokens other than the image placeholders."""
    ids = tokenizer.encode(prompt)
    return len(ids) - ids.count(tokenizer.convert_tokens_to_ids("<image>"))


def same(a, b, tolerance=1e-4):
    """Two engine outputs agree: prompt tokens, greedy tokens, and every log-probability
    both report within `tolerance`. A token in one side's top list but not the other's is
    allowed only at the list's edge, within `tolerance` of the other side's last entry:
    two runners-up that round to a tie may swap places (bfloat16), nothing more."""
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        for one, other in ((step_a, step_b), (step_b, step_a)):
            edge = min(lp.logprob for lp in other.values())
            for token, lp in one.items():
                if token in other:
                    assert abs(lp.logprob - other[token].logprob) < tolerance
                else:
                    assert lp.logprob < edge + tolerance, f"token {token} at {lp.logprob} above {edge}"
