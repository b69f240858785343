"""The OpenAI-compatible HTTP API (FastAPI/Starlette; run by uvicorn in `aion-train serve`).

    GET  /health                 {"status": "ok", "model": id}          (no API key needed)
    GET  /metrics                Prometheus text
    GET  /openapi.json           the OpenAPI schema (request bodies documented: protocol.openapi_body)
    GET  /v1/models              the one served model
    GET  /v1/models/{id}
    POST /v1/completions         prompt: str | [str] | [ids] | [[ids]]; echo, logprobs
    POST /v1/chat/completions    messages in the post-training chat template; a multimodal model: content
                                 parts text / image_url / input_audio / video (serve/mm_prompt.py)
    POST /admin/reload           re-read the policy bundle file (policy_reload.py)
    /admin/...                   the admin dashboard when create_app(admin=AdminSite) (aion_train/admin)

Sampling: temperature, top_p, top_k, max_tokens (chat: max_completion_tokens too), stop, n,
seed (same seed, same output; without one a random seed is drawn and returned in `aion`).
`stream: true` sends server-sent events in OpenAI's chunk format, then a last chunk with no
choices carrying `aion` (and `usage` with stream_options.include_usage), then
`data: [DONE]`.

Extensions: `jurisdiction` (body) or the `X-Jurisdiction` header selects the policy
(neither: the default policy; both and different: 400); every response carries
`aion`: request id, jurisdiction, policy version and sha256, bundle sha256, blocked, flags,
redactions, seed and the same per choice. A choice the policy blocked has finish_reason
"content_filter". Under a policy that changes text, `logprobs` are refused (they would show
the raw tokens). An echoed prompt is the client's own text and is returned as sent.

Errors are `{"error": {"message", "type", "param", "code"}}`: malformed JSON (400), unknown
fields (400, code unknown_parameter), a prompt too long for the context (400,
context_length_exceeded), a body over the limit (413), an unknown model (404,
model_not_found), an unknown jurisdiction (400, unknown_jurisdiction, naming the known
ones), a missing or wrong API key (401); media parts (400): to a text-only model
(media_unsupported), more than 8 (too_many_media), a URL that is not a base64 data: URL or
bytes that are no image / 16-bit WAV (invalid_media), `param` naming the part.

`POST /admin/reload` takes no body (or `{}`): it re-reads the bundle the server was started
with (`--policy`), validates it and serves it; the answer names the new and the previous
bundle sha256. It needs an API key like every route but /health; with no API keys
configured it is refused (403, admin_requires_api_key) unless the server was started with
`allow_unauthenticated_admin`. A broken bundle: 422 (invalid_policy_bundle, the message names
the file, JSON path and problem), the running bundle stays; no bundle configured: 409.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aion_train.policy import ModerationUnavailable, PolicyError, UnknownJurisdiction
from aion_train.policy.loader import json_depth

from .audit import AuditLog
from .choice import ChoiceResult
from .engine import Row
from .loading import LoadError
from .loop_bridge import LoopBridge, LoopClosed
from .media import MediaError
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, IngestRequest, openapi_body, validation_error
from .retrieval_context import RetrievalOptions
from .sampling import SamplingParams
from .service import (
    ContextError,
    PromptSpec,
    ReloadEvent,
    Service,
    aion_object,
    merged_actions,
    plan_max_tokens,
    token_str,
)
from .text import Detokenizer

log = logging.getLogger("aion_train.serve")
access_log = logging.getLogger("aion_train.serve.access")

DEFAULT_MAX_BODY = 1 << 20
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{8,64}")
MAX_BODY_DEPTH = 64
COMPLETION_DEFAULT_MAX_TOKENS = 16


def create_app(
    service: Service,
    *,
    api_keys: list[str] | None = None,
    audit: AuditLog | None = None,
    metrics: Metrics | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    retrieval=None,
    allow_unauthenticated_admin: bool = False,
    admin=None,
) -> FastAPI:
    """`retrieval`: a RetrievalContext whose best chunks for each text prompt (the last user
    message in chat) go before it as <CTX> ... </CTX>, as many whole chunks as leave room for
    the request's max_tokens; `aion.retrieval` in the response names them.
    `allow_unauthenticated_admin`: serve POST /admin/reload when no API keys are configured (else 403).
    `admin`: an aion_train.admin.AdminSite, mounted under /admin with its own sessions (the
    serving API keys neither open nor are needed for it)."""
    app = FastAPI(title="aion-train serve", version="1", docs_url=None, redoc_url=None)
    metrics = metrics or Metrics(service.policy.jurisdictions)
    metrics.set_bundle(service.policies.bundle_sha256, service.policy.jurisdictions)
    metrics.engine_jobs.set_function(lambda: service.open_jobs)
    service.add_media_listener(lambda kind, hit: metrics.media_cache.labels(kind, "hit" if hit else "miss").inc())
    app.state.service, app.state.metrics, app.state.audit = service, metrics, audit

    def _on_reload(ev: ReloadEvent) -> None:
        metrics.policy_reloads.labels("ok" if ev.ok else "failed").inc()
        info = {"path": ev.path, "previous_sha256": ev.previous_sha256, "bundle_sha256": ev.bundle_sha256}
        if ev.ok:
            metrics.set_bundle(ev.bundle_sha256, service.policy.jurisdictions)
            log.info(
                "policy bundle %s: serving %s (was %s)",
                "reloaded" if ev.changed else "re-read, unchanged",
                ev.bundle_sha256[:12],
                ev.previous_sha256[:12],
                extra={"aion": {"event": "policy_reload", "ok": True, "changed": ev.changed, **info}},
            )
        else:
            log.error(
                "policy bundle refused, still serving %s: %s",
                ev.previous_sha256[:12],
                ev.error,
                extra={"aion": {"event": "policy_reload", "ok": False, "error": str(ev.error), **info}},
            )

    service.reload_listeners.append(_on_reload)

    base_openapi = app.openapi

    def openapi_now() -> dict:
        """FastAPI's schema, with the jurisdictions of the bundle served now (reloads change them)."""
        app.openapi_schema = None
        schema = base_openapi()
        names = None if service.policies.fallback_jurisdiction else service.policy.jurisdictions
        j = {"type": "string", "maxLength": 90, **({"enum": names} if names else {})}
        for path in ("/v1/completions", "/v1/chat/completions"):
            op = schema["paths"][path]["post"]
            op["requestBody"]["content"]["application/json"]["schema"]["properties"]["jurisdiction"] = {
                "anyOf": [j, {"type": "null"}],
                "description": "selects the policy (an unknown one: 400, unless the bundle has a fallback)",
            }
            for p in op.get("parameters", []):
                if p["name"] == "X-Jurisdiction":
                    p["schema"] = j
        return schema

    app.openapi = openapi_now
    keys = [k for k in (api_keys or []) if k]
    loaded = service.loaded
    created = int(time.time())

    # ------------------------------------------------------------------ middleware
    @app.middleware("http")
    async def _frame(request: Request, call_next):
        t0 = time.monotonic()
        given_id = request.headers.get("x-request-id", "")
        request.state.request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        admin_path = admin is not None and admin.owns(request.url.path)
        if keys and request.url.path != "/health" and not admin_path:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
                resp = _error_response(
                    APIError(401, "Incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
                )
                _access(request, resp.status_code, t0)
                return resp
        metrics.in_flight.inc()
        try:
            resp = await call_next(request)
        finally:
            metrics.in_flight.dec()
        resp.headers["x-request-id"] = request.state.request_id
        _access(request, resp.status_code, t0)
        return resp

    def _access(request: Request, status: int, t0: float) -> None:
        access_log.info(
            "%s %s %d",
            request.method,
            request.url.path,
            status,
            extra={
                "aion": {
                    "request_id": getattr(request.state, "request_id", None),
                    "method": request.method,
                    "path": request.url.path,
                    "status": status,
                    "ms": round((time.monotonic() - t0) * 1000, 2),
                }
            },
        )

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(APIError(e.status_code, msg, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return _error_response(APIError(400, f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return _error_response(APIError(500, "internal server error", type="server_error"))

    # ------------------------------------------------------------------ routes
    def model_card() -> dict:
        return {
            "id": loaded.model_id,
            "object": "model",
            "created": created,
            "owned_by": "aion-train",
            "aion": {
                "kind": loaded.kind,
                "checkpoint": Path(loaded.checkpoint).name,
                "max_seq_len": loaded.max_seq_len,
                "dtype": loaded.dtype,
                "chat_template": loaded.chat,
                "modalities": ["text", "image", "audio", "video"] if loaded.multimodal else ["text"],
                "jurisdictions": service.policy.jurisdictions,
                "fallback_jurisdiction": service.policies.fallback_jurisdiction,
                "bundle_sha256": service.policies.bundle_sha256,
            },
        }

    @app.get("/health")
    async def health():
        down = service.engine_down()
        if down is not None:  # an orchestrator's probe sees it and restarts the server
            return JSONResponse({"status": "engine_down", "model": loaded.model_id, "error": down}, status_code=503)
        return {"status": "ok", "model": loaded.model_id}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != loaded.model_id:
            raise _unknown_model(model_id, loaded.model_id)
        return model_card()

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        if not keys and not allow_unauthenticated_admin:
            raise APIError(
                403,
                "admin routes need an API key: start the server with --api-key-file "
                "(or --allow-unauthenticated-admin on a trusted host)",
                type="permission_error",
                code="admin_requires_api_key",
            )
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > 1024:
                break
        if raw.strip() not in (b"", b"{}"):
            raise APIError(
                400,
                "POST /admin/reload takes no body: it re-reads the bundle file the server was started with",
                code="unknown_parameter",
            )
        if service.policies.path is None:
            raise APIError(
                409, "no policy bundle to reload: the server was started without --policy", code="no_policy_bundle"
            )
        before = service.policies.bundle_sha256
        try:
            new = await asyncio.to_thread(service.reload_policies)
        except PolicyError as e:
            raise APIError(
                422, f"policy bundle refused, the running one stays: {e}", code="invalid_policy_bundle"
            ) from None
        return {
            "reloaded": True,
            "changed": new.bundle_sha256 != before,
            "bundle_sha256": new.bundle_sha256,
            "previous_bundle_sha256": before,
            "jurisdictions": new.jurisdictions,
        }

    @app.post("/admin/ingest")
    async def admin_ingest(request: Request):
        """One batch of puts/deletes into the served continual memory (durable and visible
        to later requests on return; a request sees all of the batch or none of it)."""
        if not keys and not allow_unauthenticated_admin:
            raise APIError(
                403,
                "admin routes need an API key: start the server with --api-key-file "
                "(or --allow-unauthenticated-admin on a trusted host)",
                type="permission_error",
                code="admin_requires_api_key",
            )
        if retrieval is None or retrieval.memory is None:
            raise APIError(409, "the server's --index is not a continual memory", code="no_memory")
        try:
            body = IngestRequest.model_validate(await _read_json(request, max_body_bytes))
        except ValidationError as e:
            raise validation_error(e) from None
        docs = [d.model_dump() for d in body.documents]
        seqs = await asyncio.to_thread(retrieval.ingest, docs, body.delete)
        return {"seqs": seqs, "seq": seqs[-1] if seqs else retrieval.memory.stats()["seq"]}

    if admin is not None:  # the admin dashboard (aion_train/admin), its routes under /admin
        admin.attach(service=service, audit=audit, metrics=metrics)
        app.include_router(admin.router)

    served = {"model": {"type": "string", "enum": [loaded.model_id], "description": "the served model"}}

    jurisdiction_header = {
        "name": "X-Jurisdiction",
        "in": "header",
        "required": False,
        "description": "the policy's jurisdiction (or the body's `jurisdiction`; both and different: 400)",
        "schema": {"type": "string", "maxLength": 90},
    }

    @app.post(
        "/v1/completions",
        openapi_extra={**openapi_body(CompletionRequest, served), "parameters": [jurisdiction_header]},
    )
    async def completions(request: Request):
        return await _handle(request, "completions")

    @app.post(
        "/v1/chat/completions",
        openapi_extra={**openapi_body(ChatRequest, served), "parameters": [jurisdiction_header]},
    )
    async def chat_completions(request: Request):
        return await _handle(request, "chat")

    # ------------------------------------------------------------------ handling
    async def _handle(request: Request, endpoint: str):
        t0 = time.monotonic()
        rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + request.state.request_id
        ctx: dict[str, Any] = {
            "endpoint": endpoint,
            "request_id": rid,
            "t0": t0,
            "policy": None,
            "jurisdiction": None,
            "prompt_tokens": 0,
            "stream": False,
        }
        try:
            body = await _read_json(request, max_body_bytes)
            try:
                req = (CompletionRequest if endpoint == "completions" else ChatRequest).model_validate(body)
            except ValidationError as e:
                raise validation_error(e) from None
            ctx["stream"] = req.stream
            req.check_unsupported()
            if req.model != loaded.model_id:
                raise _unknown_model(req.model, loaded.model_id)
            header_j = request.headers.get("x-jurisdiction")
            if header_j is not None and req.jurisdiction is not None and header_j != req.jurisdiction:
                raise APIError(
                    400,
                    f"the jurisdiction field ({req.jurisdiction!r}) and the X-Jurisdiction "
                    f"header ({header_j[:90]!r}) disagree",
                    param="jurisdiction",
                    code="conflicting_jurisdiction",
                )
            j = req.jurisdiction if req.jurisdiction is not None else header_j
            ctx["jurisdiction"] = j
            try:
                policy = service.policy.resolve(j)
            except UnknownJurisdiction:
                raise APIError(
                    400,
                    f"unknown jurisdiction {str(j)[:90]!r}; known jurisdictions: "
                    f"{', '.join(service.policy.jurisdictions)}",
                    param="jurisdiction",
                    code="unknown_jurisdiction",
                ) from None
            except ModerationUnavailable as e:
                raise APIError(
                    503,
                    str(e.issues[0].message),
                    type="server_error",
                    param="jurisdiction",
                    code="moderation_unavailable",
                ) from None
            ctx["policy"] = policy
            down = service.engine_down()
            if down is not None:
                raise APIError(503, f"the engine is not running: {down}", type="server_error", code="engine_down")
            if loaded.multimodal and endpoint == "chat":  # decoding media: off the event loop
                plan = await asyncio.to_thread(_plan, req, endpoint, policy)
            else:
                plan = _plan(req, endpoint, policy)
            ctx["prompt_tokens"] = sum(len(p.ids) for p in plan["prompts"])
        except APIError as e:
            _record(ctx, e.status, [], error=e.code or e.type)
            raise
        if req.stream:
            return StreamingResponse(
                _stream(req, endpoint, plan, ctx),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return await _complete(req, endpoint, plan, ctx, request)

    def _plan(req, endpoint: str, policy) -> dict:
        ctx_len = loaded.max_seq_len
        retrieved: list[list[dict]] | None = [] if retrieval is not None else None
        if req.retrieval is not None and retrieval is None:
            raise APIError(400, "this server has no retrieval index (start it with --index DIR)", param="retrieval")
        ropts = RetrievalOptions(**req.retrieval.model_dump()) if req.retrieval is not None else None
        if ropts is not None and retrieval.memory is not None and (ropts.alpha, ropts.mmr_lambda) != (None, None):
            raise APIError(
                400, "a continual memory is searched by cosine: alpha and mmr_lambda do not apply", param="retrieval"
            )
        if endpoint == "completions":
            room = ctx_len - (req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS)
            prompts = _completion_prompts(req.prompt, room, retrieved, ropts)
            want_lp = req.logprobs is not None
            default = COMPLETION_DEFAULT_MAX_TOKENS
            max_tokens, mparam, pparam = req.max_tokens, "max_tokens", "prompt"
        elif loaded.multimodal:
            try:
                mp = loaded.render_media_chat(req.part_messages())
            except MediaError as e:
                raise APIError(400, str(e), param=e.param or "messages", code=e.code) from None
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            prompts = [PromptSpec(ids=mp.ids, context=[], text="", modality=mp.modality, media=mp.media or None)]
            want_lp, default, mparam, pparam = bool(req.logprobs), None, "max_tokens", "messages"
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if req.max_completion_tokens is not None:
                mparam = "max_completion_tokens"
        else:
            if not loaded.chat:
                req.plain_messages()  # media parts: 400 media_unsupported (a text-only model)
                raise APIError(
                    400,
                    f"model {loaded.model_id!r} is a {loaded.kind} checkpoint without the "
                    "post-training chat template; use /v1/completions",
                    param="messages",
                    code="chat_template_unavailable",
                )
            try:
                msgs = req.plain_messages()
                if retrieval is not None:
                    room = ctx_len - (req.max_completion_tokens or req.max_tokens or 1)
                    msgs = _with_context(msgs, room, retrieved, ropts)
                ids = loaded.render_chat(msgs)
            except (ValueError, LoadError) as e:
                raise APIError(400, str(e), param="messages") from None
            prompts = [PromptSpec(ids=ids, context=[], text="")]
            want_lp = bool(req.logprobs)
            default = None
            mparam, pparam = "max_tokens", "messages"
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if req.max_completion_tokens is not None:
                mparam = "max_completion_tokens"
        if want_lp and not policy.is_identity:
            raise APIError(
                400,
                f"logprobs are not available under the {policy.jurisdiction!r} policy "
                "(they would show the unenforced tokens)",
                param="logprobs",
                code="logprobs_unavailable_under_policy",
            )
        if want_lp and req.stream:
            raise APIError(400, "logprobs with stream: true are not supported yet", param="logprobs")
        try:
            max_new = [plan_max_tokens(len(p.ids), max_tokens, default, ctx_len, mparam, pparam) for p in prompts]
        except ContextError as e:
            raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from None
        if len(prompts) * req.n > 64:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is over the limit of 64 choices", param="n")
        if endpoint == "completions":
            k = req.logprobs
            echo = req.echo
        else:
            k = (req.top_logprobs or 0) if req.logprobs else None
            echo = False
        params = SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k if req.top_k > 0 else 0,
            max_tokens=max(max_new),
            stop=req.stops(),
            seed=req.seed,
            logprobs=k,
            echo=echo,
        )
        return {"prompts": prompts, "max_new": max_new, "params": params, "policy": policy, "retrieved": retrieved}

    def _with_context(msgs: list[dict], room: int, retrieved: list, ropts) -> list[dict]:
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            return msgs
        last = users[-1]

        def n_tokens(text: str) -> int:
            return len(loaded.render_chat(msgs[:last] + [{**msgs[last], "content": text}] + msgs[last + 1 :]))

        aug = retrieval.augment(msgs[last]["content"], n_tokens, room, ropts)
        retrieved.append(aug.hits)
        return msgs[:last] + [{**msgs[last], "content": aug.text}] + msgs[last + 1 :]

    def _aion(plan: dict, rid: str, results, seed) -> dict:
        out = aion_object(rid, plan["policy"], results, seed)
        if plan.get("retrieved") is not None:
            out["retrieval"] = {**retrieval.describe(), "hits": plan["retrieved"]}
        return out

    def _completion_prompts(prompt, room: int = 0, retrieved: list | None = None, ropts=None) -> list[PromptSpec]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        if isinstance(prompt[0], str):
            for p in prompt:
                if not isinstance(p, str):
                    raise APIError(400, "prompt: a list must be all strings or all token ids", param="prompt")
                if retrieved is not None:
                    aug = retrieval.augment(p, lambda t: len(loaded.encode_prompt(t)), room, ropts)
                    retrieved.append(aug.hits)
                    p = aug.text
                ids = loaded.encode_prompt(p)
                out.append(PromptSpec(ids=ids, context=ids, text=p))
            return out
        batches = [prompt] if isinstance(prompt[0], int) else prompt
        for b in batches:
            if not b:
                raise APIError(400, "prompt: token id lists must not be empty", param="prompt")
            bad = [i for i in b if not 0 <= i < loaded.vocab_size]
            if bad:
                raise APIError(
                    400, f"prompt: token ids must be in [0, {loaded.vocab_size}), got {bad[0]}", param="prompt"
                )
            if retrieved is not None:
                retrieved.append([])  # token ids: no text to retrieve for
            out.append(PromptSpec(ids=list(b), context=list(b), text=loaded.tokenizer.decode(list(b))))
        return out

    async def _client_gone(request: Request) -> None:
        """Returns when the client disconnects (the body has been read: the next ASGI message is
        http.disconnect, sent when the connection closes)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _complete(req, endpoint: str, plan: dict, ctx: dict, request: Request):
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        cancelled = {"flag": False}
        rows, choices, seed = service.build(
            plan["prompts"],
            req.n,
            plan["params"],
            plan["max_new"],
            plan["policy"],
            cancelled=lambda: cancelled["flag"],
        )
        ctx["seed"], ctx["rows"] = seed, rows

        def finished():
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        job = service.submit(rows, on_done=finished)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the handler was cancelled: stop generating, and audit it
            cancelled["flag"] = True
            _record(ctx, 499, [], error="client_disconnected")
            raise
        finally:
            gone.cancel()
        if not done.done():  # the client went away: stop its generation, audit it, answer no one
            cancelled["flag"] = True
            await done
            _record(ctx, 499, [], error="client_disconnected")
            return Response(status_code=499)
        if job.error is not None:
            _record(ctx, 500, [], error="generation_failed")
            raise APIError(500, f"generation failed: {type(job.error).__name__}", type="server_error")
        results = [c.result for c in choices]
        _ttft(ctx, rows)
        body = _response_body(req, endpoint, plan, ctx, rows, results)
        _record(ctx, 200, results)
        return JSONResponse(body)

    def _response_body(req, endpoint, plan, ctx, rows: list[Row], results: list[ChoiceResult]) -> dict:
        n = req.n
        out_choices = []
        for r, row in zip(results, rows):
            prompt = plan["prompts"][r.index // n]
            if endpoint == "completions":
                text = (prompt.text + r.text) if req.echo else r.text
                lp = _completion_logprobs(row, r, prompt, req.echo) if req.logprobs is not None else None
                out_choices.append({"index": r.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
            else:
                lp = {"content": _chat_logprobs(row, r, prompt)} if req.logprobs else None
                out_choices.append(
                    {
                        "index": r.index,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": lp,
                        "finish_reason": r.finish_reason,
                    }
                )
        return {
            "id": ctx["request_id"],
            "object": "text_completion" if endpoint == "completions" else "chat.completion",
            "created": int(time.time()),
            "model": loaded.model_id,
            "choices": out_choices,
            "usage": _usage(ctx, results),
            "aion": _aion(plan, ctx["request_id"], results, ctx["seed"]),
        }

    def _kept_tokens(row: Row, r: ChoiceResult, detok: Detokenizer) -> tuple[list[int], list[str]]:
        """The generated tokens that make up the text (a stop string's tokens are cut)."""
        texts = detok.token_texts(row.tokens)
        if sum(len(t) for t in texts) <= len(r.text):
            return list(row.tokens), texts
        keep, pos = 0, 0
        for t in texts:
            if pos >= len(r.text):
                break
            keep, pos = keep + 1, pos + len(t)
        return row.tokens[:keep], texts[:keep]

    def _completion_logprobs(row: Row, r: ChoiceResult, prompt: PromptSpec, echo: bool) -> dict:
        tok = loaded.tokenizer
        tokens, lps, tops, offsets = [], [], [], []
        pos = 0
        if echo:
            ptexts = Detokenizer(tok).token_texts(prompt.ids)
            for i, tid in enumerate(prompt.ids):
                info = row.prompt_infos[i] if i < len(row.prompt_infos) else None
                tokens.append(token_str(tok, tid))
                lps.append(None if info is None else info.logprob)
                tops.append(None if info is None else {token_str(tok, a): v for a, v in info.top})
                offsets.append(min(pos, len(prompt.text)))
                pos += len(ptexts[i])
            pos = len(prompt.text)
        ids, texts = _kept_tokens(row, r, Detokenizer(tok, prompt.context))
        for tid, t, info in zip(ids, texts, row.infos):
            tokens.append(token_str(tok, tid))
            lps.append(info.logprob if info else None)
            tops.append({token_str(tok, a): v for a, v in info.top} if info else None)
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(row: Row, r: ChoiceResult, prompt: PromptSpec) -> list[dict]:
        tok = loaded.tokenizer
        ids, _ = _kept_tokens(row, r, Detokenizer(tok, prompt.context))
        out = []
        for tid, info in zip(ids, row.infos):
            s = token_str(tok, tid)
            out.append(
                {
                    "token": s,
                    "logprob": info.logprob,
                    "bytes": list(s.encode("utf-8")),
                    "top_logprobs": [
                        {"token": token_str(tok, a), "logprob": v, "bytes": list(token_str(tok, a).encode("utf-8"))}
                        for a, v in info.top
                    ],
                }
            )
        return out

    def _usage(ctx: dict, results: list[ChoiceResult]) -> dict:
        c = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": ctx["prompt_tokens"], "completion_tokens": c, "total_tokens": ctx["prompt_tokens"] + c}

    def _ttft(ctx: dict, rows: list[Row]) -> None:
        firsts = [r.first_token_at for r in rows if r.first_token_at is not None]
        if firsts:
            metrics.ttft.labels(ctx["endpoint"]).observe(max(0.0, min(firsts) - ctx["t0"]))

    bridges: dict = {}  # event loop -> its LoopBridge (one wake-up per engine iteration)

    def _bridge(loop) -> LoopBridge:
        b = bridges.get(loop)
        if b is None or b.closed:
            listeners = service.scheduler.listeners
            listeners[:] = [x for x in listeners if not (x.closed or x.loop.is_closed())]
            for old in [k for k, v in bridges.items() if v.closed or k.is_closed()]:
                del bridges[old]
            b = bridges[loop] = LoopBridge(loop)
            listeners.append(b)
        return b

    async def _stream(req, endpoint: str, plan: dict, ctx: dict) -> AsyncIterator[bytes]:
        bridge = _bridge(asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()
        cancelled = {"flag": False}

        def put(item):
            try:
                bridge.put(q, item)
            except LoopClosed:  # the event loop is gone (shutdown): stop generating
                cancelled["flag"] = True

        rows, choices, seed = service.build(
            plan["prompts"],
            req.n,
            plan["params"],
            plan["max_new"],
            plan["policy"],
            on_delta=lambda i, text: put(("delta", i, text)),
            on_choice=lambda res: put(("choice", res.index, res)),
            cancelled=lambda: cancelled["flag"],
        )
        ctx["seed"], ctx["rows"] = seed, rows
        rid, created_at = ctx["request_id"], int(time.time())
        obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"

        def chunk(choices_: list, **extra) -> bytes:
            body = {
                "id": rid,
                "object": obj,
                "created": created_at,
                "model": loaded.model_id,
                "choices": choices_,
                **extra,
            }
            return b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n"

        def delta_choice(i: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if endpoint == "completions":
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            d: dict = {}
            if role:
                d = {"role": "assistant", "content": ""}
            elif text is not None:
                d = {"content": text}
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}

        status, results = 200, []
        try:
            n_choices = len(rows)
            for i in range(n_choices):
                if endpoint == "chat":
                    yield chunk([delta_choice(i, None, role=True)])
                elif req.echo:
                    yield chunk([delta_choice(i, plan["prompts"][i // req.n].text)])
            job = service.submit(
                rows, on_error=lambda e: put(("error", None, e)), on_done=lambda: put(("done", None, None))
            )
            finished: dict[int, ChoiceResult] = {}
            first_text = True  # time to first byte of output text, per policy
            while True:
                # everything queued since the last send goes out in one write; a choice's
                # consecutive deltas become one chunk (the concatenated text is the same)
                items, out, done = coalesce_deltas(await drain(q)), [], False
                for kind, i, item in items:
                    if kind == "delta":
                        out.append(chunk([delta_choice(i, item)]))
                        if first_text and item:
                            first_text = False
                            metrics.observe_ttfb(endpoint, plan["policy"].jurisdiction, time.monotonic() - ctx["t0"])
                    elif kind == "choice":
                        finished[i] = item
                        out.append(chunk([delta_choice(i, None, finish=item.finish_reason)]))
                    elif kind == "error":
                        status = 500
                        err = APIError(500, f"generation failed: {type(item).__name__}", type="server_error")
                        out.append(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                    elif kind == "done":
                        done = True
                        break
                if out:
                    yield b"".join(out)
                if done:
                    break
            del job
            results = [finished[k] for k in sorted(finished)]
            if status == 200:
                _ttft(ctx, rows)
                extra = {"aion": _aion(plan, rid, results, seed)}
                if req.stream_options is not None and req.stream_options.include_usage:
                    extra["usage"] = _usage(ctx, results)
                yield chunk([], **extra)
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            cancelled["flag"] = True  # the client went away: stop generating
            status = 499
            raise
        finally:
            _record(
                ctx,
                status,
                results,
                error=None if status == 200 else ("client_disconnected" if status == 499 else "generation_failed"),
            )

    # ------------------------------------------------------------------ audit + metrics
    def _record(ctx: dict, status: int, results: list[ChoiceResult], error: str | None = None) -> None:
        endpoint = ctx["endpoint"]
        policy = ctx.get("policy")
        j = policy.jurisdiction if policy is not None else ctx.get("jurisdiction")
        if results:
            completion = sum(len(r.token_ids) for r in results)
        else:  # ended early (client gone, failure): what was generated
            completion = sum(len(r.tokens) for r in ctx.get("rows", ()))
        metrics.observe_request(endpoint, status, j)
        metrics.latency.labels(endpoint, str(bool(ctx.get("stream")))).observe(time.monotonic() - ctx["t0"])
        if status == 200:
            metrics.prompt_tokens.labels(endpoint).inc(ctx["prompt_tokens"])
            metrics.completion_tokens.labels(endpoint).inc(completion)
        actions = merged_actions(results)
        if policy is not None:
            metrics.observe_actions(policy.jurisdiction, actions)
        if audit is None:
            return
        rec = {
            "request_id": ctx["request_id"],
            "endpoint": endpoint,
            "model": loaded.model_id,
            "status": status,
            "stream": bool(ctx.get("stream")),
            "jurisdiction": j if (policy is not None or j is None) else str(j)[:90],
            "known_jurisdiction": policy is not None or j is None,
            "policy_sha256": policy.policy.sha256 if policy is not None else None,
            "policy_version": policy.policy.version if policy is not None else None,
            "bundle_sha256": policy.bundle_sha256 if policy is not None else service.policies.bundle_sha256,
            "actions": actions,
            "blocked": sum(1 for r in results if r.enforcement.blocked),
            "choices": len(results),
            "prompt_tokens": ctx["prompt_tokens"],
            "completion_tokens": completion,
            "finish_reasons": [r.finish_reason for r in results],
            "latency_ms": round((time.monotonic() - ctx["t0"]) * 1000, 2),
        }
        if error:
            rec["error"] = error
        try:
            audit.append(rec)
        except Exception:  # noqa: BLE001
            log.exception("audit log write failed")

    return app


async def drain(q: asyncio.Queue) -> list:
    """The next item of `q` (waiting for it) and every item already queued behind it."""
    items = [await q.get()]
    while not q.empty():
        items.append(q.get_nowait())
    return items


def coalesce_deltas(items: list) -> list:
    """(kind, choice, payload) items with each run of one choice's consecutive "delta"
    texts joined into one item; order and every other item kept."""
    out: list = []
    for kind, i, item in items:
        if kind == "delta" and out and out[-1][0] == "delta" and out[-1][1] == i:
            out[-1] = ("delta", i, out[-1][2] + item)
        else:
            out.append((kind, i, item))
    return out


def _unknown_model(asked: str, have: str) -> APIError:
    return APIError(
        404,
        f"The model {str(asked)[:200]!r} does not exist; this server serves {have!r}",
        param="model",
        code="model_not_found",
    )


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, limit: int) -> Any:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"request body is {cl} bytes, over the {limit}-byte limit", code="request_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"request body is over the {limit}-byte limit", code="request_too_large")
        chunks.append(part)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    if json_depth(raw, stop_at=MAX_BODY_DEPTH) > MAX_BODY_DEPTH:
        raise APIError(400, f"the JSON body is nested more than {MAX_BODY_DEPTH} levels deep", code="invalid_json")
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({e}). The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(obj).__name__}", code="invalid_json")
    return obj
