"""The admin JSON API (the pages call it too); every route but POST /admin/login needs a
session, every state-changing one the session's CSRF token in `X-CSRF-Token`.

    POST /admin/login                       {"token"} -> {"csrf_token"} + session cookie
    POST /admin/logout
    GET  /admin/api/jurisdictions           the tree, versions, hashes, rule counts, last hour
    GET  /admin/api/policies/{j}            own, resolved (inherited rules marked), history
    GET  /admin/api/policies/{j}/diff?a=&b= unified diff of two versions' own documents
    POST /admin/api/validate                {"text"} or {"policy"} [, "jurisdiction"] -> {"ok", "errors"}
    POST /admin/api/try                     {"jurisdiction", "text" | "prompt" [, "policy"]}
    POST /admin/api/policies/{j}            {"policy"}: publish a new version
    POST /admin/api/policies/{j}/rollback   {"version"}: publish that version's document again
    POST /admin/api/reload                  re-read policy_bundle.json into the serving process
    GET  /admin/api/audit?jurisdiction=&rule=&since=&until=&limit=
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from aion_train.policy import MAX_POLICY_BYTES, PolicyError, UnknownJurisdiction
from aion_train.policy.loader import count_values, json_depth, parse_json_limited
from aion_train.policy.schema import MAX_JSON_VALUES

from .auth import COOKIE, CSRF_HEADER, Auth, Session
from .store import PolicyStore, StoreError

log = logging.getLogger("aion_train.admin")
MAX_BODY = 4 * MAX_POLICY_BYTES  # a policy pasted as a JSON string can double in size
MAX_TRY_TEXT = 100_000
MAX_TRY_TOKENS = 64


class AdminError(Exception):
    def __init__(self, status: int, message: str, code: str, **extra):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


def error(status: int, message: str, code: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code, **extra}}, status_code=status)


def issues_json(e: PolicyError) -> list[dict]:
    return [{"path": i.path, "message": i.message, "file": i.file} for i in e.issues]


async def read_body(request: Request, limit: int = MAX_BODY) -> dict:
    """The JSON object body, the size limit checked before anything is parsed."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise AdminError(415, "admin calls take Content-Type: application/json", "unsupported_media_type")
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise AdminError(413, f"request body is {cl} bytes, over the {limit}-byte limit", "request_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise AdminError(413, f"request body is over the {limit}-byte limit", "request_too_large")
        chunks.append(part)
    raw = b"".join(chunks)
    if json_depth(raw, stop_at=64) > 64:
        raise AdminError(400, "the JSON body is nested too deeply", "invalid_json")
    try:
        obj = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as e:
        raise AdminError(400, f"the body is not JSON: {e}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise AdminError(400, "the JSON body must be an object", "invalid_json")
    return obj


def policy_from_body(body: dict, name: str) -> Any:
    """The policy document of {"policy": {...}} or {"text": "..."} (the editor's text),
    bounded like a policy file (size, depth, values) before it is validated."""
    if "text" in body:
        text = body["text"]
        if not isinstance(text, str):
            raise PolicyError.one(name, "$", "text must be a string")
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError.one(name, "$", f"the policy is {len(data)} bytes, over the {MAX_POLICY_BYTES}-byte limit")
        return parse_json_limited(data, name)
    if "policy" not in body:
        raise AdminError(400, 'expected {"policy": {...}} or {"text": "..."}', "missing_policy")
    doc = body["policy"]
    if count_values(doc, stop_at=MAX_JSON_VALUES) > MAX_JSON_VALUES:
        raise PolicyError.one(name, "$", f"more than {MAX_JSON_VALUES} JSON values")
    if len(json.dumps(doc, ensure_ascii=False).encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyError.one(name, "$", f"the policy is over the {MAX_POLICY_BYTES}-byte limit")
    return doc


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def fingerprint(sid: str) -> str:
    """What the audit records name a session by (never the id itself)."""
    return hashlib.sha256(sid.encode()).hexdigest()[:12]


def build_api(site) -> APIRouter:
    """The JSON routes of `site` (an AdminSite)."""
    r = APIRouter(route_class=site.route_class)
    store: PolicyStore = site.store
    auth: Auth = site.auth

    def session_or_401(request: Request, state_changing: bool = False) -> Session:
        s = auth.session(request.cookies.get(COOKIE))
        if s is None:
            raise AdminError(401, 'log in first: POST /admin/login {"token": ...}', "not_authenticated")
        if state_changing and not Auth.csrf_ok(s, request.headers.get(CSRF_HEADER)):
            raise AdminError(403, "missing or wrong X-CSRF-Token header", "csrf_failed")
        return s

    @r.post("/admin/login")
    async def login(request: Request):
        client = client_of(request)
        if not auth.enabled:
            return error(403, "the admin dashboard is off: no admin token is configured", "admin_disabled")
        if auth.too_many_failures(client):
            return error(429, "too many failed logins; wait a few minutes", "too_many_failures")
        body = await read_body(request, 4096)
        token = body.get("token")
        who = auth.check_token(token) if isinstance(token, str) else None
        if who is None:
            await asyncio.sleep(auth.failure_delay(client))
            auth.record_failure(client)
            site.audit_admin("login_failed", None, client, status=401)
            return error(401, "wrong admin token", "invalid_token")
        auth.clear_failures(client)
        s = auth.new_session(who, client)
        site.audit_admin("login", s, client)
        resp = JSONResponse({"csrf_token": s.csrf, "who": who, "expires_in": int(auth.ttl)})
        resp.set_cookie(COOKIE, s.sid, max_age=int(auth.ttl), path="/admin", httponly=True, samesite="strict")
        return resp

    @r.post("/admin/logout")
    async def logout(request: Request):
        s = session_or_401(request, state_changing=True)
        auth.end(s.sid)
        site.audit_admin("logout", s, client_of(request))
        resp = JSONResponse({"logged_out": True})
        resp.delete_cookie(COOKIE, path="/admin")
        return resp

    @r.get("/admin/api/jurisdictions")
    async def jurisdictions(request: Request):
        session_or_401(request)
        return site.jurisdictions()

    @r.get("/admin/api/policies/{j}")
    async def policy(request: Request, j: str):
        session_or_401(request)
        return site.policy_view(j)

    @r.get("/admin/api/policies/{j}/diff")
    async def diff(request: Request, j: str, a: str, b: str):
        session_or_401(request)
        try:
            return {"jurisdiction": j, "a": a, "b": b, "diff": store.diff(j, a, b)}
        except StoreError as e:
            return error(e.status, str(e), e.code)

    @r.post("/admin/api/validate")
    async def validate(request: Request):
        session_or_401(request, state_changing=True)
        body = await read_body(request)
        j = body.get("jurisdiction") if isinstance(body.get("jurisdiction"), str) else None
        try:
            doc = policy_from_body(body, f"{j or 'policy'}.json")
        except PolicyError as e:
            return {"ok": False, "errors": issues_json(e)}
        issues = await asyncio.to_thread(store.validate, doc, j)
        return {"ok": not issues, "errors": [{"path": i.path, "message": i.message, "file": i.file} for i in issues]}

    @r.post("/admin/api/try")
    async def try_it(request: Request):
        session_or_401(request, state_changing=True)
        body = await read_body(request)
        return await site.try_policy(body)

    @r.post("/admin/api/policies/{j}")
    async def publish(request: Request, j: str):
        s = session_or_401(request, state_changing=True)
        body = await read_body(request)
        if set(body) != {"policy"}:
            return error(400, 'publish takes {"policy": {...}}', "unknown_parameter")
        try:
            doc = policy_from_body(body, f"{j}.json")
            entry = await asyncio.to_thread(store.publish, j, doc, s.who)
        except PolicyError as e:
            return error(422, "the policy is not valid; nothing was published", "invalid_policy", errors=issues_json(e))
        return await site.after_publish(entry, s, client_of(request))

    @r.post("/admin/api/policies/{j}/rollback")
    async def rollback(request: Request, j: str):
        s = session_or_401(request, state_changing=True)
        body = await read_body(request)
        v = body.get("version")
        if set(body) != {"version"} or not isinstance(v, str):
            return error(400, 'rollback takes {"version": "x.y.z"}', "unknown_parameter")
        try:
            entry = await asyncio.to_thread(store.rollback, j, v, s.who)
        except PolicyError as e:
            return error(
                422,
                f"version {v} is not valid any more; nothing was published",
                "invalid_policy",
                errors=issues_json(e),
            )
        return await site.after_publish(entry, s, client_of(request))

    @r.post("/admin/api/reload")
    async def reload(request: Request):
        s = session_or_401(request, state_changing=True)
        return await site.reload(s, client_of(request))

    @r.get("/admin/api/audit")
    async def audit(
        request: Request,
        jurisdiction: str | None = None,
        rule: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 200,
    ):
        session_or_401(request)
        return await asyncio.to_thread(site.audit_view, jurisdiction, rule, since, until, limit)

    return r


__all__ = ["AdminError", "UnknownJurisdiction", "StoreError", "build_api", "error", "read_body"]
