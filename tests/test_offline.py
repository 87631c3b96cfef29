"""Offline vLLM engine (LLM.generate) with the PAR plugin: what the KV cache holds."""

import pytest

from par_vllm import ARCHITECTURE
from par_vllm.demo import demo_image
from par_vllm.server import par_overrides

from offline_engine import close, generate, make_llm, text_tokens

pytestmark = pytest.mark.slow  # real vLLM engines

N = 576  # visual tokens per 336 px image at patch 14
PROMPT = "USER: <image>\nWhat color is the triangle?\nASSISTANT:"
QUESTION_TYPE_PROMPT = "USER: <image>\nWhat kind of shape is red?\nASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nWhich shape is larger?\nASSISTANT:"


@pytest.fixture(scope="module")
def results(demo_model):
    """Everything the tests check, from one PAR engine and one plain LLaVA engine (engine
    start-up dominates the cost, so each is started once)."""
    image = demo_image()
    res = {}
    llm = make_llm(demo_model, par_overrides(keep_ratio=0.25))
    res["server_default"] = generate(llm, PROMPT, image)
    for kwargs in [{"par_keep_ratio": r} for r in (0.002, 0.05, 0.111, 0.5, 1.0)] + [
        {"par_num_tokens": n} for n in (1, 10, 100, 575, 576, 1000)
    ]:
        res[tuple(kwargs.items())] = generate(llm, PROMPT, image, kwargs)
    for method in ("pool", "random", "topk", "diverse"):
        kwargs = {"par_method": method, "par_num_tokens": 30}
        res[tuple(kwargs.items())] = generate(llm, PROMPT, image, kwargs)
    res["pool_consecutive"] = generate(llm, PROMPT, image, {"par_method": "pool", "par_num_tokens": 30,
                                                            "par_positions": "consecutive"})
    for drop in (None, True, False):
        keys = {"par_num_tokens": 10} | ({} if drop is None else {"par_drop_question_type_words": drop})
        res["question_type", drop] = generate(llm, QUESTION_TYPE_PROMPT, image, keys)
    res["two_images"] = generate(llm, TWO_IMAGES, [image, image.rotate(90)], {"par_num_tokens": 32})
    res["disabled"] = generate(llm, PROMPT, image, {"par_enabled": False})
    res["disabled_two"] = generate(llm, TWO_IMAGES, [image, image.rotate(90)], {"par_enabled": False})
    close(llm)
    # The shortest override, the architecture alone: par_positions="auto" serves consecutive
    # positions, and only those can be served.
    llm = make_llm(demo_model, {"architectures": [ARCHITECTURE]})
    res["no_override_pool"] = generate(llm, PROMPT, image, {"par_method": "pool", "par_num_tokens": 30})
    try:
        generate(llm, PROMPT, image, {"par_positions": "span"})
    except ValueError as error:
        res["no_override_span_error"] = error
    close(llm)
    llm = make_llm(demo_model)  # the stock LlavaForConditionalGeneration
    res["plain"] = generate(llm, PROMPT, image)
    res["plain_two"] = generate(llm, TWO_IMAGES, [image, image.rotate(90)])
    close(llm)
    return res


@pytest.mark.parametrize(
    "kwargs, k",
    [((("par_keep_ratio", 0.002),), 2), ((("par_keep_ratio", 0.05),), 29),
     ((("par_keep_ratio", 0.111),), 64), ((("par_keep_ratio", 0.5),), 288),
     ((("par_keep_ratio", 1.0),), 576), ((("par_num_tokens", 1),), 1),
     ((("par_num_tokens", 10),), 10), ((("par_num_tokens", 100),), 100),
     ((("par_num_tokens", 575),), 575), ((("par_num_tokens", 576),), 576),
     ((("par_num_tokens", 1000),), 576)],
)
def test_prompt_tokens_are_text_plus_k(results, tokenizer, kwargs, k):
    out = results[kwargs]
    assert len(out.prompt_token_ids) == text_tokens(tokenizer, PROMPT) + k
    assert out.outputs[0].token_ids, "an answer was generated"


@pytest.mark.parametrize("method", ["pool", "random", "topk", "diverse"])
def test_baselines_run_in_the_engine_at_the_same_budget(results, tokenizer, method):
    out = results[(("par_method", method), ("par_num_tokens", 30))]
    assert len(out.prompt_token_ids) == text_tokens(tokenizer, PROMPT) + 30
    assert out.outputs[0].token_ids


def test_server_default_budget_comes_from_hf_overrides(results, tokenizer):
    assert len(results["server_default"].prompt_token_ids) == text_tokens(tokenizer, PROMPT) + 144


def test_each_image_of_a_prompt_gets_k(results, tokenizer):
    assert len(results["two_images"].prompt_token_ids) == text_tokens(tokenizer, TWO_IMAGES) + 2 * 32


def test_without_par_it_is_text_plus_n_exactly_as_plain_llava(results, tokenizer):
    for par, plain, prompt, images in [("disabled", "plain", PROMPT, 1),
                                       ("disabled_two", "plain_two", TWO_IMAGES, 2)]:
        a, b = results[par], results[plain]
        assert len(b.prompt_token_ids) == text_tokens(tokenizer, prompt) + images * N
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token, lp in step_a.items():
                assert abs(lp.logprob - step_b[token].logprob) < 1e-4


def test_question_type_words_reach_the_engine(results, demo_model):
    """par_drop_question_type_words changes the prompt the engine scores the image against:
    where the two rewrites keep different tokens (checked first, in transformers), the
    model's next-token distribution differs too; dropping is the default."""
    from par_vllm.settings import ParSettings
    from par_vllm.explain import Explainer

    explainer = Explainer(demo_model)
    kept = [explainer.reduce(demo_image(), "What kind of shape is red?",
                             ParSettings(num_tokens=10, drop_question_type_words=drop)).kept_indices.tolist()
            for drop in (True, False)]
    assert kept[0] != kept[1]
    default, dropped, kept_words = (results["question_type", drop].outputs[0].logprobs[0]
                                    for drop in (None, True, False))
    token = next(iter(dropped))
    assert token not in kept_words or abs(dropped[token].logprob - kept_words[token].logprob) > 1e-6
    assert default.keys() == dropped.keys()
    assert all(abs(default[t].logprob - dropped[t].logprob) < 1e-5 for t in default)


def test_plugin_loads_in_every_tensor_parallel_worker(results, demo_model, tokenizer, monkeypatch):
    """Two worker processes (tensor parallel 2; on a CPU each bound to its own core): both
    must load the plugin, and PAR must give what the single-worker engine gave."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = make_llm(demo_model, par_overrides(keep_ratio=0.111), tensor_parallel_size=2,
                   distributed_executor_backend="mp")
    out = generate(llm, PROMPT, demo_image())
    close(llm)
    single = results[(("par_keep_ratio", 0.111),)]
    assert len(out.prompt_token_ids) == text_tokens(tokenizer, PROMPT) + 64
    assert out.outputs[0].token_ids == single.outputs[0].token_ids


@pytest.fixture(scope="module")
def pooled_reference(demo_model, tokenizer):
    """First-step log-probabilities in transformers, from the pooled tokens (the torch
    reference) at the positions par_vllm.positions gives, with span and without."""
    import torch

    from par_vllm.baselines import uniform_pool
    from par_vllm.explain import Explainer
    from par_vllm.positions import image_positions

    num_kept = 30
    explainer = Explainer(demo_model)
    visual = explainer.visual_tokens(demo_image())
    tokens = uniform_pool(visual, None, None, num_kept, None).tokens[0]
    ids = tokenizer.encode(PROMPT)
    at = ids.index(tokenizer.convert_tokens_to_ids("<image>"))
    embed = explainer.model.get_input_embeddings()
    reference = {}
    with torch.no_grad():
        inputs = torch.cat([embed(torch.tensor(ids[:at])), tokens, embed(torch.tensor(ids[at + 1:]))])[None]
        for span in (True, False):
            positions, _ = image_positions(inputs.shape[1], [(at, num_kept, visual.shape[1], span)])
            hidden = explainer.model.model.language_model(inputs_embeds=inputs,
                                                          position_ids=positions[:1]).last_hidden_state
            reference[span] = torch.log_softmax(explainer.model.lm_head(hidden[0, -1]), dim=-1)
    return reference


@pytest.mark.parametrize("span", [True, False])
def test_positions_in_the_engine_are_the_reference_positions(results, pooled_reference, span):
    """The engine's first answer token, with its log-probability, is what transformers gives
    for the same K tokens at par_vllm.positions' positions; span is the default."""
    out = results[(("par_method", "pool"), ("par_num_tokens", 30))] if span else results["pool_consecutive"]
    ((token, logprob),) = ((t, lp.logprob) for t, lp in out.outputs[0].logprobs[0].items() if t == out.outputs[0].token_ids[0])
    reference = pooled_reference[span]
    # On the random-weight demo model the two placements move this log-probability by
    # about 5e-4: the engine must match its own placement well inside that gap (it agrees
    # with transformers to float32 precision), or serving the other placement would pass.
    assert token == reference.argmax().item()
    assert abs(logprob - reference[token].item()) < 1e-4
    other = pooled_reference[not span]
    assert abs(other[token].item() - reference[token].item()) > 2e-4  # the positions matter


def test_a_server_without_the_positions_override_serves_consecutive_positions(results):
    """Without the M-RoPE switch in --hf-overrides, the default par_positions="auto" serves
    consecutive positions, as the switched-on engine does with "consecutive" (M-RoPE with
    identical rows is plain RoPE), and a request for "span" is refused, naming the setting."""
    plain, switched = results["no_override_pool"], results["pool_consecutive"]
    assert plain.prompt_token_ids == switched.prompt_token_ids
    assert plain.outputs[0].token_ids == switched.outputs[0].token_ids
    for step_a, step_b in zip(plain.outputs[0].logprobs, switched.outputs[0].logprobs):
        for token, lp in step_a.items():
            assert abs(lp.logprob - step_b[token].logprob) < 1e-4
    error = results.get("no_override_span_error")
    assert error is not None and "par_positions" in str(error)
