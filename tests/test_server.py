"""A real vLLM OpenAI server with PAR on 127.0.0.1, driven by the official openai client."""

import base64
import json
import urllib.error
import urllib.request

import openai
import pytest

from par_vllm.settings import ParSettings
from par_vllm.demo import chat_messages, demo_image, image_data_url
from par_vllm.server import CPU_ENGINE_ARGS, VllmServer, par_overrides

pytestmark = pytest.mark.slow  # real vLLM engines

N, K = 576, 64
QUESTIONS = ["What color is the triangle?", "Where is the blue circle?"]
SERVER_ARGS = [*CPU_ENGINE_ARGS, "--trust-request-mm-kwargs", "--enable-prompt-tokens-details",
               "--limit-mm-per-prompt", '{"image": 2}',
               # The CPU default block (128 tokens) is longer than these prompts: with 32,
               # the blocks holding the image placeholders are shareable across requests.
               "--block-size", "32"]
CACHING_ON = ["--enable-prefix-caching", "--mm-processor-cache-gb", "1"]
CACHING_OFF = ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]


def ask(server, messages, max_tokens=8, **extra_body):
    response = server.client().chat.completions.create(
        model="par-demo", messages=messages, max_tokens=max_tokens, temperature=0.0,
        logprobs=True, top_logprobs=3, extra_body=extra_body or None,
    )
    content = response.choices[0].logprobs.content
    return {
        "text": response.choices[0].message.content,
        "prompt_tokens": response.usage.prompt_tokens,
        "image_tokens": (response.usage.prompt_tokens_details.multimodal_tokens or {}).get("image", 0),
        "video_tokens": (response.usage.prompt_tokens_details.multimodal_tokens or {}).get("video", 0),
        "logprobs": [(step.token, step.logprob) for step in content],
    }


def same_answer(a, b):
    assert a["text"] == b["text"] and a["prompt_tokens"] == b["prompt_tokens"]
    assert [t for t, _ in a["logprobs"]] == [t for t, _ in b["logprobs"]]
    assert all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a["logprobs"], b["logprobs"]))


# The PAR API routes are opt-in, as vLLM requires for endpoint plugins.
PLUGINS = {"VLLM_PLUGINS": "par_vllm,par_vllm_api"}


def par_samples(server) -> dict:
    """Every `par_*` sample on /metrics, by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(server.get("/metrics"))
        for sample in family.samples if sample.name.startswith("par_")
    }


@pytest.fixture(scope="module")
def fresh_start(demo_model):
    """A server with every cache off: /metrics before any request, then each question
    about the same image."""
    with VllmServer(demo_model, hf_overrides=par_overrides(),
                    extra_args=SERVER_ARGS + CACHING_OFF) as server:
        metrics_at_start = par_samples(server)
        answers = [ask(server, chat_messages(q, demo_image())) for q in QUESTIONS]
        conversations = {first: converse(server, first) for first in QUESTIONS}
        # The same conversation, its assistant turns the same, under "image_and_latest".
        return (metrics_at_start, answers, conversations,
                converse(server, QUESTIONS[0], answers=conversations[QUESTIONS[0]], rule="image_and_latest"))


@pytest.fixture(scope="module")
def fresh_answers(fresh_start):
    return fresh_start[1]


LATER_TURNS = ["And the circle?", "Is the square yellow?", "What about the star?"]


def converse(server, first_question, answers=None, rule="image", **settings):
    """A four-turn conversation about one image, each later turn asking about another part
    of it, under `par_query_turn=rule` (None: the server's default) and any other `par_`
    `settings`; the assistant turns are `answers` (the cache-free server's, so that both
    servers see the same prompts) or, where none are given, the server's own. Each turn's
    answer, and the prefix-cache hits the turn added."""
    messages = chat_messages(first_question, demo_image())
    turns = []
    for i, question in enumerate([None, *LATER_TURNS]):
        if question is not None:
            reply = (answers or turns)[i - 1]["text"]
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
        before = cache_hits(server)
        kwargs = {**({"par_query_turn": rule} if rule else {}), **settings}
        turns.append({**ask(server, messages, **({"mm_processor_kwargs": kwargs} if kwargs else {})),
                      "cache_hits": cache_hits(server) - before})
    return turns


def cache_hits(server) -> float:
    lines = [line for line in server.get("/metrics").splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    return sum(float(line.split()[-1]) for line in lines)


@pytest.fixture(scope="module")
def server(demo_model, fresh_answers):
    with VllmServer(demo_model, hf_overrides=par_overrides(),
                    extra_args=SERVER_ARGS + CACHING_ON, env=PLUGINS) as server:
        yield server


def test_the_language_model_runs_its_own_rope_on_one_row(server):
    """LLaVA's positions reach the language model through M-RoPE as three identical rows;
    the model runs the checkpoint's own RoPE on the first (vLLM's fused op on a CPU) rather
    than M-RoPE, which is the same rotation on identical rows."""
    assert "the language model runs its own RoPE on the first" in server.log_tail(200_000)


def test_chat_completion_with_a_base64_image(server):
    with_par = ask(server, chat_messages(QUESTIONS[0], demo_image()))
    without = ask(server, chat_messages(QUESTIONS[0], demo_image()), mm_processor_kwargs={"par_enabled": False})
    assert with_par["text"] and without["text"]
    assert with_par["image_tokens"] == K and without["image_tokens"] == N
    assert without["prompt_tokens"] - with_par["prompt_tokens"] == N - K
    quarter = ask(server, chat_messages(QUESTIONS[0], demo_image()), mm_processor_kwargs={"par_keep_ratio": 0.25})
    assert quarter["image_tokens"] == 144


def test_caches_never_hand_one_prompts_tokens_to_another(server, fresh_answers):
    # Interleave, and repeat, so the processor, encoder and prefix caches are all warm.
    # The image's placeholders precede the question, so without the prompt in the image's
    # identity the prefix cache would reuse the first question's image KV for the second.
    for _ in range(2):
        for question, fresh in zip(QUESTIONS, fresh_answers):
            same_answer(ask(server, chat_messages(question, demo_image())), fresh)
    # The two questions' answers are further apart than same_answer's tolerance, so a cache
    # that handed one question's image tokens to the other would fail above.
    assert max(abs(a - b) for (_, a), (_, b) in zip(fresh_answers[0]["logprobs"], fresh_answers[1]["logprobs"])) > 1e-3
    metrics = server.get("/metrics")
    hits = [line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) > 0, "the prefix cache was in use"


def test_later_turns_of_a_conversation_reuse_the_prefix_cache_and_answer_as_without_it(server, fresh_start):
    """Under query_turn="image" the image is scored against the question it came
    with, so turns 2-4 find its reduced tokens (and the first turn) in the prefix cache; two
    conversations about the same image with different first questions still never share
    them: every turn answers as the cache-free server did."""
    fresh = fresh_start[2]
    for first in QUESTIONS:
        turns = converse(server, first, answers=fresh[first])
        for turn, cache_free in zip(turns, fresh[first]):
            same_answer(turn, cache_free)
            assert turn["image_tokens"] == K
        assert all(turn["cache_hits"] >= K for turn in turns[1:]), [t["cache_hits"] for t in turns]


def test_each_later_question_is_shown_the_image_again_reduced_for_it_and_each_turn_finds_the_last_cached(
        server, fresh_start):
    """Under query_turn="image_and_latest" each later question carries a view of the image
    of its own (K placeholders and the newline after the image token) at the start of its
    message, and keeps it in the turns after, so each turn's prompt is the previous one's
    with the reply and the new question appended: the prefix cache holds all of the previous
    prompt. Every turn answers as the cache-free server did."""
    fresh_image_rule, fresh = fresh_start[2][QUESTIONS[0]], fresh_start[3]
    turns = converse(server, QUESTIONS[0], answers=fresh_image_rule, rule="image_and_latest")
    for i, (turn, cache_free) in enumerate(zip(turns, fresh)):
        same_answer(turn, cache_free)
        assert turn["image_tokens"] == (i + 1) * K
        # The same conversation under "image": the prompts differ by the views alone.
        assert turn["prompt_tokens"] - fresh_image_rule[i]["prompt_tokens"] == i * (K + 1)
    block = int(SERVER_ARGS[SERVER_ARGS.index("--block-size") + 1])
    hits = [turn["cache_hits"] for turn in turns]
    assert all(hit >= before["prompt_tokens"] // block * block for hit, before in zip(hits[1:], turns)), hits


def test_the_views_together_hold_no_more_tokens_than_the_image_and_each_turn_still_finds_the_last_cached(server):
    # At 40%, K = 231 of 576: turns 2 and 3 get their views (462 tokens), turn 4's would
    # make 693, so it gets none and its prompt is turn 3's with the reply and question after.
    k = 231
    turns = converse(server, QUESTIONS[1], rule="image_and_latest", par_keep_ratio=0.4)
    assert [turn["image_tokens"] for turn in turns] == [k, 2 * k, 3 * k, 3 * k]
    block = int(SERVER_ARGS[SERVER_ARGS.index("--block-size") + 1])
    hits = [turn["cache_hits"] for turn in turns]
    assert all(hit >= before["prompt_tokens"] // block * block for hit, before in zip(hits[1:], turns)), hits


def test_by_default_each_later_question_is_shown_the_image_again(server):
    # The default is query_turn="image_and_latest".
    turns = converse(server, QUESTIONS[0], rule=None)
    assert [turn["image_tokens"] for turn in turns] == [K, 2 * K, 3 * K, 4 * K]


def test_under_latest_each_turn_scores_the_image_against_the_latest_question(server):
    # query_turn="latest" reduces the image again for every new question, so no later turn
    # finds the image's reduced tokens in the prefix cache.
    turns = converse(server, QUESTIONS[0], rule="latest")
    assert all(turn["image_tokens"] == K for turn in turns)
    assert all(turn["cache_hits"] < K for turn in turns[1:]), [t["cache_hits"] for t in turns]


def post_chat(server, body: str):
    request = urllib.request.Request(
        f"{server.base_url}/v1/chat/completions", data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    "kwargs, setting",
    [({"par_keep_ratio": 0}, "par_keep_ratio"), ({"par_keep_ratio": -0.1}, "par_keep_ratio"),
     ({"par_keep_ratio": 1.5}, "par_keep_ratio"), ({"par_keep_ratio": "0.5"}, "par_keep_ratio"),
     ({"par_num_tokens": 0}, "par_num_tokens"), ({"par_relevance": "median"}, "par_relevance"),
     ({"par_bogus": 1}, "par_bogus"), ({"par_enabled": "off"}, "par_enabled")],
)
def test_bad_settings_get_a_400_naming_the_setting(server, kwargs, setting):
    with pytest.raises(openai.BadRequestError) as info:
        ask(server, chat_messages(QUESTIONS[0], demo_image()), mm_processor_kwargs=kwargs)
    assert info.value.status_code == 400
    assert setting in info.value.message
    assert ask(server, chat_messages(QUESTIONS[0], demo_image()))["image_tokens"] == K


def test_nan_setting_gets_a_400(server):
    body = json.dumps({"model": "par-demo", "max_tokens": 4,
                       "messages": chat_messages(QUESTIONS[0], demo_image()),
                       "mm_processor_kwargs": {"par_keep_ratio": float("nan")}})
    status, payload = post_chat(server, body)
    assert status == 400 and "par_keep_ratio" in payload["error"]["message"]
    assert ask(server, chat_messages(QUESTIONS[0], demo_image()))["image_tokens"] == K


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64," + base64.b64encode(b"definitely not a png").decode(),
     "data:image/png;base64,",
     image_data_url(demo_image())[:200]],  # truncated PNG
)
def test_corrupt_or_empty_image_gets_a_client_error(server, url):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTIONS[0]}]}]
    with pytest.raises(openai.APIStatusError) as info:
        ask(server, messages)
    assert 400 <= info.value.status_code < 500
    assert ask(server, chat_messages(QUESTIONS[0], demo_image()))["image_tokens"] == K


def test_image_with_no_question_is_answered(server):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(demo_image())}}]}]
    answer = ask(server, messages)
    assert answer["text"] and answer["image_tokens"] == K


def test_text_only_request_is_answered(server):
    answer = ask(server, [{"role": "user", "content": "Say hello."}])
    assert answer["text"] and answer["image_tokens"] == 0


def test_two_images_in_one_request(server):
    messages = chat_messages("Which shape is larger?", demo_image())
    messages[0]["content"].insert(1, {"type": "image_url",
                                      "image_url": {"url": image_data_url(demo_image().rotate(90))}})
    answer = ask(server, messages)
    assert answer["text"] and answer["image_tokens"] == 2 * K


def test_three_images_over_the_limit_get_a_400(server):
    messages = chat_messages("Which shape is larger?", demo_image())
    for angle in (90, 180):
        messages[0]["content"].insert(1, {"type": "image_url",
                                          "image_url": {"url": image_data_url(demo_image().rotate(angle))}})
    with pytest.raises(openai.BadRequestError):
        ask(server, messages)
    assert ask(server, chat_messages(QUESTIONS[0], demo_image()))["image_tokens"] == K


def metric(samples, name, modality=None):
    """A sample's value for the demo model; per-item metrics for one modality, or summed
    over all."""
    def wanted(labels):
        labels = dict(labels)
        return (labels.get("model_name") == "par-demo" and labels.keys() <= {"model_name", "modality"}
                and modality in (None, labels.get("modality")))

    return sum(value for (sample, labels), value in samples.items() if sample == name and wanted(labels))


def test_warm_up_and_profiling_do_not_count(fresh_start):
    metrics_at_start = fresh_start[0]
    assert all(value == 0 for value in metrics_at_start.values())


def test_par_metrics_count_exactly_what_was_served(server):
    before = par_samples(server)
    ask(server, chat_messages(QUESTIONS[0], demo_image()))                      # 576 -> 64
    ask(server, chat_messages(QUESTIONS[0], demo_image()),                      # 576 -> 576
        mm_processor_kwargs={"par_enabled": False})
    ask(server, [{"role": "user", "content": [                                  # 576 -> 64, no text
        {"type": "image_url", "image_url": {"url": image_data_url(demo_image())}}]}])
    two = chat_messages("Which shape is larger?", demo_image())                 # 2 x (576 -> 32)
    two[0]["content"].insert(1, {"type": "image_url",
                                 "image_url": {"url": image_data_url(demo_image().rotate(90))}})
    ask(server, two, mm_processor_kwargs={"par_num_tokens": 32})
    ask(server, [{"role": "user", "content": "Say hello."}])                    # no image
    after = par_samples(server)
    delta = {name: metric(after, name) - metric(before, name) for name in [
        "par_images_reduced_total", "par_visual_tokens_before_total", "par_visual_tokens_after_total",
        "par_visual_tokens_saved_total", "par_kept_share_count", "par_kept_share_sum",
        "par_prompt_agnostic_requests_total", "par_disabled_requests_total"]}
    assert delta == {
        "par_images_reduced_total": 4,
        "par_visual_tokens_before_total": 5 * 576,
        "par_visual_tokens_after_total": 64 + 576 + 64 + 2 * 32,
        "par_visual_tokens_saved_total": 5 * 576 - (64 + 576 + 64 + 2 * 32),
        "par_kept_share_count": 5,
        "par_kept_share_sum": pytest.approx(64 / 576 + 1 + 64 / 576 + 2 * 32 / 576),
        "par_prompt_agnostic_requests_total": 1,
        "par_disabled_requests_total": 1,
    }


def test_par_config_endpoint_reports_the_effective_settings(server):
    config = json.loads(server.get("/v1/par/config"))
    assert config["par_active"] is True and config["per_request_overrides"] is True
    assert config["model"] == "par-demo"
    # positions "auto" made concrete: par_overrides() switches vLLM's positions on
    assert config["settings"] == ParSettings(positions="span").to_keys()


def test_grafana_dashboard_queries_only_metrics_the_server_exports(server):
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    ask(server, chat_messages(QUESTIONS[0], demo_image()))  # labelled series exist once used
    exported = set()
    for family in text_string_to_metric_families(server.get("/metrics")):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/dashboards/par.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries.append(dashboard["templating"]["list"][0]["query"])
    used = {m for q in queries for m in re.findall(r"\b(?:par_|vllm:)[A-Za-z0-9_:]+", q)}
    assert any(m.startswith("par_") for m in used) and any(m.startswith("vllm:") for m in used)
    assert used <= exported, used - exported


def test_the_shortest_serve_command_starts_and_reduces(demo_model):
    """`vllm serve MODEL --hf-overrides '{"architectures": ["ParLlavaForConditionalGeneration"]}'`
    and nothing else: every image reduced with the default budget, the kept tokens at
    consecutive positions (the default "auto" without vLLM's positions switched on), said
    in one start-up line."""
    from par_vllm import ARCHITECTURE

    with VllmServer(demo_model, hf_overrides={"architectures": [ARCHITECTURE]},
                    extra_args=[*CPU_ENGINE_ARGS, "--enable-prompt-tokens-details"]) as server:
        answer = ask(server, chat_messages(QUESTIONS[0], demo_image()))
        log = server.log_tail(200_000)
    assert answer["text"] and answer["image_tokens"] == K
    (line,) = [line for line in log.splitlines() if "PAR: K = " in line]
    assert "K = ceil(N x par_keep_ratio=0.111) per image by default; kept tokens at consecutive positions" in line


def test_the_serving_benchmark_generates_exactly_its_output_tokens(server, tokenizer):
    """benchmarks/serve.py's requests run to max_tokens even where the model would stop:
    here an end-of-text token made certain (a logit bias) would end the answer at once."""
    from benchmarks.serve import image_part, one_request

    stop_now = {"logit_bias": {str(tokenizer.eos_token_id): 100}}
    assert one_request(server.client(), image_part(336)(0), 6, stop_now)["completion_tokens"] == 6
