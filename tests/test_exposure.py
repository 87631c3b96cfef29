"""What a deployment exposes to clients: the request body bound and the media connector
that fetches no URL (both run inside a real server in tests/test_fuzz.py)."""

import asyncio
import json

import pytest

from par_vllm.limits import RequestBodyLimit


def call(middleware_app, chunks, headers=()):
    """Drive an ASGI app with a request body in `chunks`; return (status, body, what the app read)."""
    seen = {}

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": list(headers)}
    asyncio.run(middleware_app(app)(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), seen.get("body")


def test_a_body_within_the_limit_reaches_the_app_whole():
    status, body, read = call(lambda app: RequestBodyLimit(app, max_bytes=10), [b"abc", b"defg"],
                              headers=[(b"content-length", b"7")])
    assert status == 200 and read == b"abcdefg"


@pytest.mark.parametrize("headers", [[(b"content-length", b"11")], []])  # declared, or chunked
def test_a_larger_body_gets_a_413_in_openai_form_and_never_reaches_the_app(headers):
    status, body, read = call(lambda app: RequestBodyLimit(app, max_bytes=10), [b"abcdef", b"ghijk"], headers)
    assert status == 413 and read is None
    error = json.loads(body)["error"]
    assert error["code"] == 413 and "PAR_MAX_REQUEST_BYTES" in error["message"]


def test_a_malformed_length_is_refused():
    status, _, read = call(lambda app: RequestBodyLimit(app, max_bytes=10), [b"a"], [(b"content-length", b"-1")])
    assert status == 413 and read is None


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PAR_MAX_REQUEST_BYTES", "3")
    assert RequestBodyLimit(None).max_bytes == 3


def test_the_no_fetch_connector_loads_data_urls_and_refuses_the_rest():
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    import par_vllm
    from par_vllm.demo import demo_image, image_data_url
    from par_vllm.media import NAME

    par_vllm.register()
    connector = MEDIA_CONNECTOR_REGISTRY.load(NAME)
    assert connector.fetch_image(image_data_url(demo_image())).size == (336, 336)
    for url in ["http://127.0.0.1:9/a.png", "https://example.com/a.png", "ftp://x/a.png",
                "file:///etc/hostname", "HTTP://example.com/a.png"]:
        with pytest.raises(ValueError, match="does not"):
            connector.fetch_image(url)
    with pytest.raises(ValueError, match="does not fetch"):
        asyncio.run(connector.fetch_image_async("http://127.0.0.1:9/a.png"))
