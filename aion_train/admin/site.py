"""AdminSite: the store, the sessions, the serving process it publishes into (optional), the
audit log and the metrics, and the routes (JSON API + pages) under /admin."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from aion_train.policy import PolicyError, PolicySet, UnknownJurisdiction
from aion_train.serve.audit import verify

from .api import AdminError, build_api, error, fingerprint
from .auth import Auth
from .store import PolicyStore, StoreError
from .tryit import run_try

log = logging.getLogger("aion_train.admin")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class AdminRoute(APIRoute):
    """Admin errors as JSON, and the security headers on every admin answer."""

    def get_route_handler(self):
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                resp = await inner(request)
            except AdminError as e:
                resp = error(e.status, str(e), e.code, **e.extra)
            except StoreError as e:
                resp = error(e.status, str(e), e.code)
            except UnknownJurisdiction as e:
                resp = error(404, str(e.issues[0].message), "unknown_jurisdiction")
            for k, v in SECURITY_HEADERS.items():
                resp.headers.setdefault(k, v)
            return resp

        return handler


class AdminSite:
    route_class = AdminRoute

    def __init__(
        self, bundle_dir, tokens: list[tuple[str, str]], *, service=None, audit=None, metrics=None, ttl=8 * 3600
    ):
        self.store = PolicyStore(bundle_dir)
        self.auth = Auth(tokens, ttl=ttl)
        self.service, self.audit, self.metrics = service, audit, metrics

    def attach(self, service=None, audit=None, metrics=None) -> AdminSite:
        self.service = service if service is not None else self.service
        self.audit = audit if audit is not None else self.audit
        self.metrics = metrics if metrics is not None else self.metrics
        return self

    @staticmethod
    def owns(path: str) -> bool:
        """The paths the admin side authenticates itself (serving API keys do not open them);
        POST /admin/reload and /admin/ingest are the serving API's own routes (API key)."""
        return (path == "/admin" or path.startswith("/admin/")) and path not in ("/admin/reload", "/admin/ingest")

    @property
    def router(self) -> APIRouter:
        from .pages import build_pages

        r = APIRouter()
        r.include_router(build_api(self))
        r.include_router(build_pages(self))
        return r

    def app(self) -> FastAPI:
        """The admin on its own (`aion-train admin`)."""
        app = FastAPI(title="aion-train admin", docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(self.router)
        return app

    # ------------------------------------------------------------------ audit
    def audit_admin(self, action: str, session, client: str, status: int = 200, **fields) -> None:
        if self.audit is None:
            return
        rec = {
            "endpoint": "admin",
            "admin_action": action,
            "who": session.who if session is not None else None,
            "session": fingerprint(session.sid) if session is not None else None,
            "client": client,
            "status": status,
            **fields,
        }
        try:
            self.audit.append(rec)
        except Exception:  # noqa: BLE001
            log.exception("audit log write failed")

    def audit_view(self, jurisdiction, rule, since, until, limit) -> dict:
        if self.audit is None:
            return {"configured": False, "records": [], "verify": None}
        path = Path(self.audit.path)
        res = verify(path)
        out: list[dict] = []
        import json

        with open(path, encoding="utf-8") as f:
            for ln in f:
                try:
                    rec = json.loads(ln)
                except ValueError:
                    continue
                if jurisdiction and rec.get("jurisdiction") != jurisdiction:
                    continue
                if rule and rule not in (rec.get("actions") or {}) and rec.get("rule") != rule:
                    continue
                t = rec.get("time", "")
                if (since and t < since) or (until and t > until):
                    continue
                out.append(rec)
        limit = max(1, min(int(limit), 2000))
        return {
            "configured": True,
            "path": path.name,
            "verify": {
                "ok": res.ok,
                "records": res.records,
                "head": res.head,
                "bad_line": res.bad_line,
                "reason": res.reason,
            },
            "matched": len(out),
            "records": out[::-1][:limit],
        }

    # ------------------------------------------------------------------ views
    def _served(self) -> PolicySet:
        if self.service is not None:
            return self.service.policies
        return PolicySet.load(self.store.bundle_path)

    def jurisdictions(self) -> dict:
        bundle = self.store.bundle
        recent = self.metrics.recent.summary() if self.metrics is not None else {}
        items = []
        for j, entry in bundle["jurisdictions"].items():
            pol = entry["policy"]
            lin = entry["lineage"]
            counts: dict[str, int] = {"block": 0, "redact": 0, "flag": 0}
            for rule in pol["rules"]:
                counts[rule["action"]] += 1
            unrestricted = (
                not pol["rules"]
                and not pol["required_notices"]
                and pol["max_output_chars"] is None
                and not pol["output_moderation"].get("enabled")
            )
            last = recent.get(j, {})
            items.append(
                {
                    "jurisdiction": j,
                    "parent": lin[-2]["jurisdiction"] if len(lin) > 1 else None,
                    "version": pol["version"],
                    "sha256": entry["sha256"],
                    "rules": len(pol["rules"]),
                    "own_rules": len(lin[-1]["rules"]),
                    "rule_counts": counts,
                    "moderation": bool(pol["output_moderation"].get("enabled")),
                    "unrestricted": unrestricted,
                    "builtin": entry["sources"][-1] == "<built-in default>",
                    "last_hour": {
                        "requests": last.get("requests", 0),
                        "policy_actions": last.get("policy_actions", 0),
                        "actions": last.get("actions", {}),
                    },
                }
            )
        children: dict[str | None, list[str]] = {}
        for it in items:
            children.setdefault(it["parent"], []).append(it["jurisdiction"])
        served = self.service.policies.bundle_sha256 if self.service is not None else None
        return {
            "bundle_sha256": bundle["bundle_sha256"],
            "served_bundle_sha256": served,
            "fallback_jurisdiction": bundle.get("fallback_jurisdiction"),
            "metrics": self.metrics is not None,
            "jurisdictions": items,
            "tree": {"roots": children.get(None, []), "children": {k: v for k, v in children.items() if k}},
        }

    def policy_view(self, j: str) -> dict:
        bundle = self.store.bundle
        entry = bundle["jurisdictions"].get(j)
        if entry is None:
            raise AdminError(404, f"unknown jurisdiction {j[:90]!r}", "unknown_jurisdiction")
        origin = {}
        for lin in entry["lineage"]:
            for rid in lin["rules"]:
                origin[rid] = lin["jurisdiction"]
        resolved = dict(entry["policy"])
        resolved["rules"] = [
            {**rule, "from": origin.get(rule["id"], j), "inherited": origin.get(rule["id"], j) != j}
            for rule in entry["policy"]["rules"]
        ]
        return {
            "jurisdiction": j,
            "version": entry["policy"]["version"],
            "sha256": entry["sha256"],
            "bundle_sha256": bundle["bundle_sha256"],
            "parent": entry["lineage"][-2]["jurisdiction"] if len(entry["lineage"]) > 1 else None,
            "lineage": entry["lineage"],
            "builtin": entry["sources"][-1] == "<built-in default>",
            "own": self.store.own_doc(j),
            "resolved": resolved,
            "history": self.store.history(j)[::-1],
        }

    async def try_policy(self, body: dict) -> dict:
        return await run_try(self, body)

    # ------------------------------------------------------------------ publishing
    async def after_publish(self, entry: dict, session, client: str) -> dict:
        self.audit_admin(
            entry["action"],
            session,
            client,
            jurisdiction=entry["jurisdiction"],
            policy_version=entry["version"],
            policy_sha256=entry["policy_sha256"],
            bundle_sha256=entry["bundle_sha256"],
            previous_bundle_sha256=entry["previous_bundle_sha256"],
            **({"rollback_of": entry["rollback_of"]} if "rollback_of" in entry else {}),
        )
        out: dict[str, Any] = {"published": entry}
        if self.service is not None:
            out["reload"] = await self.reload(session, client, published=True)
        return out

    async def reload(self, session, client: str, published: bool = False) -> dict:
        if self.service is None:
            return {"reloaded": False, "reason": "no serving process in this admin (run `serve --policy-poll`)"}
        before = self.service.policies.bundle_sha256
        try:
            new = await asyncio.to_thread(self.service.reload_policies, self.store.bundle_path)
        except PolicyError as e:
            self.audit_admin("reload", session, client, status=422, error=str(e)[:500])
            raise AdminError(422, f"bundle refused, the running one stays: {e}", "invalid_policy_bundle") from None
        self.audit_admin(
            "reload",
            session,
            client,
            bundle_sha256=new.bundle_sha256,
            previous_bundle_sha256=before,
            after_publish=published,
        )
        return {"reloaded": True, "bundle_sha256": new.bundle_sha256, "previous_bundle_sha256": before}
