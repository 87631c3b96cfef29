"""A media connector that never fetches a URL: the deployment default.

vLLM's own connector fetches any http(s) URL a client names, internal addresses
included, unless `--allowed-media-domains` lists the hosts it may fetch from. A server
whose clients send their images inline (as `data:` URLs, as the openai client does with a
base64 image) needs no fetching at all. Selected through vLLM's own extension point:

    VLLM_MEDIA_CONNECTOR=par_no_url_fetch

The Docker entrypoint selects it unless PAR_ALLOWED_MEDIA_DOMAINS names hosts to fetch from.
"""

from __future__ import annotations

from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector

NAME = "par_no_url_fetch"


class NoUrlFetchMediaConnector(MediaConnector):
    """vLLM's connector, less fetching: `data:` URLs (and `file:` URLs under
    `--allowed-local-media-path`, which is off unless the operator sets it) only."""

    def _refuse_remote(self, url: str) -> None:
        # ValueError is what vLLM answers with a 400.
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "file" and self.allowed_local_media_path is None:
            raise ValueError("This server does not read local files: send the image inline as a data: "
                             "URL (base64)")
        if scheme not in ("data", "file"):
            raise ValueError("This server does not fetch media from URLs: send the image inline as a "
                             "data: URL (base64), or ask the operator to allow a domain")

    def load_from_url(self, url, media_io, *, fetch_timeout=None):
        self._refuse_remote(url)
        return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)

    async def load_from_url_async(self, url, media_io, *, fetch_timeout=None):
        self._refuse_remote(url)
        return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)


def register() -> None:
    MEDIA_CONNECTOR_REGISTRY.register(NAME)(NoUrlFetchMediaConnector)
