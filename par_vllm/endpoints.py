"""HTTP routes on vLLM's own OpenAI server, through the `vllm.endpoint_plugins` entry point.

Opt-in, as vLLM requires for plugin routes: start the server with
`VLLM_PLUGINS=par_vllm,par_vllm_api` (naming `par_vllm` too, since the variable is also
the allowlist of general plugins).

    GET /v1/par/config   the effective PAR settings of the running server
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel

from . import ARCHITECTURES
from .positions import declares_positions
from .settings import ParSettings, settings_from_hf_config


class ParConfigResponse(BaseModel):
    model: str
    par_active: bool  # the server runs the PAR architecture
    per_request_overrides: bool  # --trust-request-mm-kwargs: requests may change settings
    settings: dict[str, object]  # server defaults, as `par_*` keys, positions made concrete


def server_config(hf_config, model: str, trust_request_settings: bool) -> ParConfigResponse:
    active = hf_config is not None and bool(set(ARCHITECTURES) & set(getattr(hf_config, "architectures", None) or []))
    settings = ParSettings()
    if hf_config is not None:
        settings = settings_from_hf_config(hf_config).with_positions(declares_positions(hf_config))
    return ParConfigResponse(model=str(model), par_active=active, per_request_overrides=trust_request_settings,
                             settings=settings.to_keys())


class ParApiPlugin:
    name = "par_vllm_api"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        @app.get("/v1/par/config", response_model=ParConfigResponse)
        async def par_config(request: Request) -> ParConfigResponse:
            return request.app.state.par_config

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # vLLM's render-only server: no model behind it
            hf_config, model = None, str(getattr(args, "model", ""))
        else:
            model_config = engine_client.model_config
            hf_config, model = model_config.hf_config, model_config.served_model_name
        state.par_config = server_config(hf_config, model, bool(getattr(args, "trust_request_mm_kwargs", False)))
