"""The admin dashboard (issue 16): per-jurisdiction policies edited, tried, published and
audited in a web page, under /admin of the serving app (`serve --admin-token-file F`) or on
its own (`aion-train admin --bundle DIR`).

    auth.py     admin tokens (file or environment), server-side sessions, CSRF, slowed failures
    store.py    the policy files: versions, history, diff, publish (build_bundle), rollback, import
    api.py      the JSON API (see its docstring and the README)
    tryit.py    raw vs enforced for a text or the live model's answer
    pages.py    Jinja2 pages (autoescape) + templates/ + static/ (one script, one style sheet)
    site.py     AdminSite: ties them to the serving process, the audit log and the metrics
"""

from .auth import Auth, read_admin_tokens, tokens_from
from .site import AdminSite
from .store import PolicyStore

__all__ = ["AdminSite", "Auth", "PolicyStore", "read_admin_tokens", "tokens_from"]
