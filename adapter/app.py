"""The FastAPI application: lifespan (engine and tokenizer, once), routes (a few lines each), error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from adapter import API_VERSION, __version__
from adapter.engine import Engine
from adapter.errors import ModelNotFoundError, install_exception_handlers
from adapter.metrics import CONTENT_TYPE, Metrics
from adapter.middleware import AccessLogMiddleware, APIKeyMiddleware, BodyLimitMiddleware
from adapter.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from adapter.serving_base import ServedModel
from adapter.serving_chat import ChatRenderer, OpenAIServingChat
from adapter.serving_completion import OpenAIServingCompletion
from adapter.settings import Settings
from launcher.startup_heap import freeze_startup_heap

logger = logging.getLogger("adapter.app")

router = APIRouter()

# The dependencies are coroutines: FastAPI runs a plain `def` one in its thread pool, a thread hop on every
# request (~0.35 ms of each first token).


async def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def _model(request: Request) -> ServedModel:
    return request.app.state.served_model


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


# The generation routes first: FastAPI tries a request's path against the routes in order (twice: the app's routes,
# then this router's), ~35 us of every completion when they came last. And they read their serving object from the
# app's state themselves: a dependency costs FastAPI ~18 us of every request to solve (in-process, warm).
@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
    serving: OpenAIServingChat = raw.app.state.serving_chat
    return await serving.create(body, raw)


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw: Request) -> Response:
    serving: OpenAIServingCompletion = raw.app.state.serving_completion
    return await serving.create(body, raw)


@router.get("/v1/health/live")
async def health_live() -> dict:
    return {"status": "live"}


@router.get("/v1/health/ready")
async def health_ready(engine: Engine = Depends(_engine)) -> Response:
    if await engine.is_ready():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready"}, status_code=503)


@router.get("/v1/models")
async def list_models(model: ServedModel = Depends(_model)) -> dict:
    return ModelList(data=[_card(model)]).model_dump(mode="json")


@router.get("/v1/models/{name:path}")
async def retrieve_model(name: str, model: ServedModel = Depends(_model)) -> dict:
    if name != model.name:
        raise ModelNotFoundError(name)
    return _card(model).model_dump(mode="json")


@router.get("/v1/metrics")
async def metrics(registry: Metrics = Depends(_metrics)) -> Response:
    return Response(await registry.render(), media_type=CONTENT_TYPE)


@router.get("/v1/metadata")
async def metadata(model: ServedModel = Depends(_model)) -> dict:
    return _metadata(model)


@router.get("/v1/version")
async def version() -> dict:
    return {"release": __version__, "api": API_VERSION}


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, root=model.name, max_model_len=model.max_model_len)


def _metadata(model: ServedModel) -> dict:
    """NIM's `/v1/metadata` shape (`version`, `modelInfo`, `assetInfo`), with what this server knows."""
    return {
        "version": __version__,
        "modelInfo": [{"shortName": model.name, "modelUrl": model.name, "maxModelLen": model.max_model_len,
                       "vocabSize": model.vocab_size}],
        "assetInfo": [model.name],
        "licenseInfo": None,
        "repository_override": "",
    }


def load_tokenizer(settings: Settings) -> Any | None:
    if settings.model_dir is None:
        logger.warning("MODEL_DIR is not set: no tokenizer, so no chat template and no logprob token texts")
        return None
    from tokenization.tokenizer import Tokenizer  # noqa: PLC0415 - heavy import, only when serving a model

    return Tokenizer.from_dir(settings.model_dir)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    tokenizer: Any | None = None,
    render: ChatRenderer | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """The app; `engine`, `tokenizer` and `render` replace the real ones (tests). `freeze_heap`: the serving
    process keeps what startup built out of the garbage collector's full collections (launcher/startup_heap.py)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_tokenizer = tokenizer if tokenizer is not None else await asyncio.to_thread(load_tokenizer, settings)
        the_engine = engine
        if the_engine is None:
            from adapter.triton_engine import TritonEngine  # noqa: PLC0415 - tests run without Triton

            the_engine = TritonEngine(
                settings.triton_grpc_url,
                settings.triton_model_name,
                settings.triton_engine_model_name,
                ready_timeout_s=settings.triton_health_timeout_s,
                tokenizer=the_tokenizer if settings.pipeline_in_adapter else None,
            )
        chat_template = settings.chat_template_override() or getattr(the_tokenizer, "chat_template", None)
        served = ServedModel(
            name=settings.model_name,
            max_model_len=settings.resolved_max_model_len(),
            root=str(settings.model_dir) if settings.model_dir else None,
            vocab_size=settings.resolved_vocab_size() or getattr(the_tokenizer, "vocab_size", None),
        )
        metrics = Metrics(served.name, settings.resolved_triton_metrics_url() if engine is None else None)
        app.state.settings = settings
        app.state.engine = the_engine
        app.state.served_model = served
        app.state.metrics = metrics
        coalesce = settings.sse_coalesce
        app.state.serving_chat = OpenAIServingChat(the_engine, served, the_tokenizer, chat_template, render, metrics,
                                                   coalesce)
        app.state.serving_completion = OpenAIServingCompletion(the_engine, served, the_tokenizer, metrics, coalesce)
        logger.info("serving %s from Triton at %s (model %s)", served.name, settings.triton_grpc_url,
                    settings.triton_model_name)
        if freeze_heap:
            logger.info("%d startup objects frozen", freeze_startup_heap())
        try:
            yield
        finally:
            await the_engine.close()

    app = FastAPI(title="OpenAI-compatible LLM API", version=__version__, lifespan=lifespan)
    install_exception_handlers(app)
    app.include_router(router)
    # The last added runs first: keys are checked before a body is read.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_body_bytes)
    keys = settings.resolved_api_keys()
    app.add_middleware(APIKeyMiddleware, keys=keys)
    logger.info("API keys: %s", f"required ({len(keys)} configured)" if keys else "off")
    app.add_middleware(AccessLogMiddleware)  # outermost of ours: rejected requests are logged too
    return app
