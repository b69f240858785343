"""The HTML pages: server-rendered Jinja2 (autoescape on), one static script and one style
sheet served by the package (no inline script, no assets from the network; see the CSP in
site.py). Without a session every page answers 401 with the login form."""

from __future__ import annotations

from pathlib import Path

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from .auth import COOKIE

HERE = Path(__file__).resolve().parent
STATIC = {"admin.js": "text/javascript; charset=utf-8", "admin.css": "text/css; charset=utf-8"}
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HERE / "templates")),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
)


def render(name: str, status: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(_env.get_template(name).render(**ctx), status_code=status)


def build_pages(site) -> APIRouter:
    r = APIRouter(route_class=site.route_class)

    def page(request: Request, name: str, **ctx) -> HTMLResponse:
        s = site.auth.session(request.cookies.get(COOKIE))
        if s is None:
            return render("login.html", status=401, page="login", csrf="", who="", enabled=site.auth.enabled)
        return render(name, csrf=s.csrf, who=s.who, **ctx)

    @r.get("/admin/login")
    async def login_page():
        return render("login.html", page="login", csrf="", who="", enabled=site.auth.enabled)

    @r.get("/admin")
    @r.get("/admin/")
    async def index(request: Request):
        if site.auth.session(request.cookies.get(COOKIE)) is None:
            return page(request, "index.html")
        data = site.jurisdictions()
        by = {it["jurisdiction"]: it for it in data["jurisdictions"]}
        return page(request, "index.html", page="index", data=data, by=by)

    @r.get("/admin/policies/{j}")
    async def policy(request: Request, j: str):
        if site.auth.session(request.cookies.get(COOKIE)) is None:
            return page(request, "policy.html")
        from .api import AdminError

        try:
            view = site.policy_view(j)
        except AdminError as e:
            s = site.auth.session(request.cookies.get(COOKIE))
            return render("error.html", status=e.status, page="error", csrf=s.csrf, who=s.who, message=str(e))
        import json

        own = view["own"]
        editor = json.dumps(own, indent=2, ensure_ascii=False) if own is not None else ""
        return page(request, "policy.html", page="policy", view=view, editor=editor)

    @r.get("/admin/audit")
    async def audit(request: Request):
        return page(request, "audit.html", page="audit")

    @r.get("/admin/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name])

    return r
