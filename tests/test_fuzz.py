"""Bad and odd input from an untrusted client, against a real server started as the Docker
entrypoint starts it, with per-request PAR settings allowed (PAR_TRUST_REQUEST_SETTINGS=1).

Every request gets either a 4xx with an OpenAI error body (naming the setting or key when
the plugin refused it) or a 200 with the right number of image tokens; /health answers
after each; a fixed request answers identically before and after all of them; under a
mixed load at concurrency 8 nothing is lost and every answer equals the same request
sent alone.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from par_vllm.demo import demo_image
from par_vllm.server import CPU_ENGINE_ARGS, VllmServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
N, K = 576, 64
QUESTION = "What color is the triangle?"
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 20_000_000


def data_url(image: Image.Image, fmt: str = "PNG", mime: str | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:{mime or 'image/' + fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = data_url(demo_image())


def chat(text: str | None = QUESTION, images=(IMAGE,), **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"model": "par-demo", "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Case:
    name: str
    body: dict | bytes
    image_tokens: int | None = None  # a 200 with this many image tokens; None: a 4xx
    names: str | None = None         # what a 4xx message must name
    status: int | None = None        # an exact 4xx status, where one is required


def ok(name, body, image_tokens=K):
    return Case(name, body, image_tokens=image_tokens)


def bad(name, body, names=None, status=None):
    return Case(name, body, names=names, status=status)


def setting(name, value, image_tokens=None, **more):
    """A request that sets `par_<name>` (and `more`): a 200 with image_tokens, or a 400 naming it."""
    kwargs = {f"par_{name}": value, **{f"par_{k}": v for k, v in more.items()}}
    label = f"par_{name}={value!r}" + "".join(f",{k}={v!r}" for k, v in more.items())
    if image_tokens is None:
        return bad(label, chat(mm_processor_kwargs=kwargs), names=f"par_{name}", status=400)
    return ok(label, chat(mm_processor_kwargs=kwargs), image_tokens)


nan, inf = math.nan, math.inf
BAD_SETTINGS = {
    "enabled": ["yes", 1, None],
    "keep_ratio": ["0.5", nan, inf, -inf, 0, -0.1, 1.5, True, None, [0.5]],
    "num_tokens": [0, -3, 3.5, "8", inf],
    "outlier_factor": [-1, nan, "1"],
    "retrieval_share": [1.01, -inf],
    "min_retrieved": [-1, 2.5],
    "duplicate_threshold": [0, 1.2, nan],
    "relevance": ["median", 3],
    "drop_question_type_words": ["no"],
    "knn_k": [0, 65, 5.5],
    "centres": ["kmeans"],
    "centre_relevance": [-0.5, 17, inf],
    "merge_repeats": ["yes", 1],
    "similarity": ["euclidean"],
    "routing": ["random"],
    "positions": ["raster", None],
    "method": ["magic", None, "evs", "frames"],  # video-only methods, and a LLaVA reduces no videos
    # Server settings: no request may change them, whatever the value.
    "backend": ["triton", "torch", "auto"],
    "allowed_request_kwargs": [["size"]],
    # The processor's own keys: never taken from a request.
    "settings": [{"backend": "triton"}],
    "query_ids": [[10 ** 9]],
    "full_tokens": [1],
    "bogus": [1],
}


def image_cases() -> list[Case]:
    picture = demo_image()
    wide, tall = Image.new("RGB", (3000, 2), (200, 30, 30)), Image.new("RGB", (2, 3000), (30, 30, 200))
    valid = [
        ("grayscale", data_url(picture.convert("L"))),
        ("grayscale+alpha", data_url(picture.convert("LA"))),
        ("rgba", data_url(picture.convert("RGBA"))),
        ("palette", data_url(picture.convert("P"))),
        ("16-bit", data_url(picture.convert("L").convert("I;16"))),
        ("1-bit", data_url(picture.convert("1"))),
        ("cmyk-jpeg", data_url(picture.convert("CMYK"), "JPEG")),
        ("jpeg", data_url(picture, "JPEG")),
        ("webp", data_url(picture, "WEBP")),
        ("gif", data_url(picture, "GIF")),
        ("bmp", data_url(picture, "BMP")),
        ("png-labelled-jpeg", data_url(picture, "PNG", mime="image/jpeg")),
        ("1x1", data_url(Image.new("RGB", (1, 1), (255, 0, 0)))),
        ("2x2", data_url(Image.new("RGB", (2, 2), (0, 255, 0)))),
        ("3000x2", data_url(wide)),
        ("2x3000", data_url(tall)),
        ("4000x4000", data_url(Image.new("RGB", (4000, 4000), (90, 90, 90)))),
    ]
    cases = [ok(f"image {name}", chat(images=[url])) for name, url in valid]
    cases.append(ok("image rgba kept as rgba (media_io_kwargs image_mode=None)",
                    chat(images=[data_url(picture.convert("RGBA"))],
                         media_io_kwargs={"image": {"image_mode": None}})))
    broken = [
        ("not an image", "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()),
        ("empty data url", "data:image/png;base64,"),
        ("truncated png", IMAGE[:300]),
        ("bad base64", "data:image/png;base64,@@@@"),
        ("over the pixel limit", data_url(Image.new("RGB", (5000, 5000)))),
        ("http url", "http://127.0.0.1:9/image.png"),
        ("https url", "https://example.com/image.png"),
        ("file url", "file:///etc/hostname"),
        ("ftp url", "ftp://127.0.0.1/image.png"),
        ("not a url", "hello"),
        ("empty url", ""),
    ]
    cases += [bad(f"image {name}", chat(images=[url])) for name, url in broken]
    cases += [
        ok("two images", chat(images=[IMAGE, data_url(picture.rotate(90))]), 2 * K),
        bad("three images (limit 2)", chat(images=[IMAGE] * 3)),
        bad("image_url without url", {**chat(), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {}}, {"type": "text", "text": QUESTION}]}]}),
        bad("over the request size limit", chat(images=[
            "data:image/png;base64," + base64.b64encode(bytes(MAX_REQUEST_BYTES)).decode()]), status=413),
    ]
    return cases


def prompt_cases() -> list[Case]:
    return [
        ok("image alone", chat(text=None)),
        ok("empty text", chat(text="")),
        ok("stop words only", chat(text="the of and is it")),
        ok("question-type words only", chat(text="what color is it?")),
        ok("control characters", chat(text="\x00\x07\x1b[31m what \ufeff\u202e color\r\n\t")),
        ok("the image placeholder in the text", chat(text="look at <image> here")),
        bad("more image placeholders than images", chat(text="look at <image> and <image>")),
        ok("chinese and emoji", chat(text="三角形是什么颜色？ 🔺🔺")),
        ok("one very long word", chat(text="a" * 3000)),
        bad("prompt longer than the model", chat(text="word " * 3000)),
        ok("text only", chat(images=()), 0),
        bad("no messages", {**chat(), "messages": []}),
        bad("negative max_tokens", chat(max_tokens=-1)),
        bad("mm_processor_kwargs not an object", chat(mm_processor_kwargs="par_keep_ratio=0.5")),
        bad("not json", b"{\"model\": \"par-demo\", \"messages\": ["),
    ]


def processor_key_cases() -> list[Case]:
    keys = [{"size": {"shortest_edge": 168}, "crop_size": {"height": 168, "width": 168}},
            {"do_resize": False}, {"do_normalize": False}, {"return_tensors": "np"}, {"": 1}]
    return [bad(f"image processor key {next(iter(k))!r}", chat(mm_processor_kwargs=k), names=next(iter(k)),
                status=400) for k in keys]


def valid_setting_cases() -> list[Case]:
    return [
        setting("num_tokens", None, K),
        setting("num_tokens", 1, 1),
        setting("num_tokens", 575, 575),
        setting("num_tokens", 10 ** 12, N),
        setting("keep_ratio", 1e-9, 1),
        setting("keep_ratio", 1.0, N),
        setting("keep_ratio", 1, N),
        setting("enabled", False, N),
        *[setting("method", m, 9, num_tokens=9) for m in ("pool", "random", "topk", "diverse")],
        setting("routing", "nearest", 2, similarity="cosine", centres="farthest_point", num_tokens=2),
        setting("min_retrieved", 10 ** 6, 1, retrieval_share=1.0, num_tokens=1),
        setting("knn_k", 64, 519, keep_ratio=0.9),
        setting("relevance", "mean", K, centre_relevance=16, outlier_factor=0),
        setting("duplicate_threshold", 1.0, K),
        setting("duplicate_threshold", 1e-9, K),
        setting("positions", "consecutive", K),
        setting("drop_question_type_words", False, K),
    ]


CASES = [
    *[setting(name, value) for name, values in BAD_SETTINGS.items() for value in values],
    *processor_key_cases(),
    *valid_setting_cases(),
    *image_cases(),
    *prompt_cases(),
]


def post(server, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN/Infinity as Python writes them
    request = urllib.request.Request(f"{server.base_url}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def answer(payload: dict) -> dict:
    usage = payload["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return {"text": payload["choices"][0]["message"]["content"], "prompt_tokens": usage["prompt_tokens"],
            "image_tokens": (details.get("multimodal_tokens") or {}).get("image", 0)}


FIXED = chat(text="Where is the blue circle?", logprobs=True, top_logprobs=2, max_tokens=6)


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    """The Docker entrypoint's server, on loopback, with per-request settings allowed."""
    server = VllmServer(demo_model, env={
        "MODEL": str(demo_model), "PAR_TRUST_REQUEST_SETTINGS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus")),
        "PAR_MAX_IMAGES_PER_REQUEST": "2", "PAR_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "VLLM_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)})
    server.env["PORT"] = str(server.port)
    server.env.pop("TRITON_INTERPRET", None)  # as in production: no Triton on a CPU
    server.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{server.env['PATH']}"  # par-vllm
    server.command = ["bash", str(ROOT / "deploy/docker-entrypoint.sh"), *CPU_ENGINE_ARGS,
                      "--max-num-seqs", "8", "--host", "127.0.0.1", "--served-model-name", "par-demo",
                      "--enable-prompt-tokens-details"]
    with server:
        status, payload = post(server, FIXED)
        assert status == 200, payload
        server.fixed_answer = payload
        yield server


def test_the_server_runs_par_with_per_request_settings_on(server):
    config = json.loads(server.get("/v1/par/config"))
    assert config["par_active"] and config["per_request_overrides"]


def test_enough_kinds_of_bad_and_odd_input():
    assert len(CASES) >= 60 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_or_odd_input(server, case):
    status, payload = post(server, case.body)
    if case.image_tokens is None:
        assert 400 <= status < 500, (status, payload)
        assert case.status is None or status == case.status, (status, payload)
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"], payload
        assert case.names is None or case.names in error["message"], error
    else:
        assert status == 200, (status, payload)
        assert answer(payload)["image_tokens"] == case.image_tokens, payload["usage"]
    assert server.healthy(), server.log_tail()


def test_the_engine_reduced_every_batch_with_the_reference_and_no_kernel_failed(server):
    """What the engine's workers count reaches /metrics (multiprocess mode, as the entrypoint
    sets it up): on a CPU every batch is reduced by the torch reference; the one demo image
    under many questions and settings was encoded once and then found in the feature cache."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, s.labels.get("implementation") or s.labels.get("result")): s.value
               for family in text_string_to_metric_families(server.get("/metrics")) for s in family.samples}
    assert samples.get(("par_engine_batches_total", "torch"), 0) > 0
    assert samples.get(("par_engine_batches_total", "triton"), 0) == 0
    assert samples.get(("par_kernel_fallbacks_total", None), 0) == 0
    assert samples.get(("par_feature_cache_lookups_total", "hit"), 0) > 0
    assert samples.get(("par_feature_cache_lookups_total", "miss"), 0) > 0


def test_the_fixed_request_answers_identically_after_the_fuzz(server):
    status, payload = post(server, FIXED)
    assert status == 200
    before, after = server.fixed_answer, payload
    assert answer(after) == answer(before)
    steps = [(s["token"], s["logprob"]) for s in before["choices"][0]["logprobs"]["content"]]
    again = [(s["token"], s["logprob"]) for s in after["choices"][0]["logprobs"]["content"]]
    assert [t for t, _ in again] == [t for t, _ in steps]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(again, steps))


# The mixed load: budgets, methods, one and two images, image-only and text-only requests,
# and bad requests interleaved.
LOAD = [
    chat(),
    chat(text="Where is the blue circle?", mm_processor_kwargs={"par_keep_ratio": 0.25}),
    chat(text="Is there a yellow square?", mm_processor_kwargs={"par_num_tokens": 16}),
    chat(mm_processor_kwargs={"par_method": "topk", "par_num_tokens": 32}),
    chat(mm_processor_kwargs={"par_method": "pool", "par_keep_ratio": 0.11}),
    chat(text="Which shape is larger?", images=[IMAGE, data_url(demo_image().rotate(90))]),
    chat(mm_processor_kwargs={"par_enabled": False}),
    chat(text=None, mm_processor_kwargs={"par_method": "diverse"}),
    chat(text="Say hello.", images=()),
    chat(mm_processor_kwargs={"par_backend": "triton"}),
    chat(mm_processor_kwargs={"par_keep_ratio": nan}),
    chat(images=["data:image/png;base64,AAAA"]),
]


def test_mixed_load_at_concurrency_8_loses_nothing_and_matches_sequential_answers(server):
    alone = [post(server, body) for body in LOAD]
    load = [i for _ in range(4) for i in range(len(LOAD))]  # 48 requests, each kind 4 times
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: post(server, LOAD[i]), load))
    assert len(results) == len(load)
    for i, (status, payload) in zip(load, results):
        assert status < 500, payload
        assert status == alone[i][0], (i, status, payload)
        if status == 200:
            assert answer(payload) == answer(alone[i][1]), i
        else:
            assert payload["error"]["message"] == alone[i][1]["error"]["message"]
    assert server.healthy()
