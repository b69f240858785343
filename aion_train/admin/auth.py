"""Admin authentication: tokens from a file, server-side sessions, CSRF tokens, slowed
failed logins.

The token file holds one token a line (blank lines and `#` comments skipped), optionally
preceded by a name and a space (`alice 0f3c...`): the name is who the audit records say did
it (`admin` without one). Tokens are compared in constant time and never logged. No token
configured: every login is refused (fails closed).

A session is a random 256-bit id kept in memory on the server (the cookie carries nothing
else), with its own random CSRF token and an expiry; logging out or restarting the server
ends it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass

COOKIE = "aion_admin_session"
CSRF_HEADER = "x-csrf-token"
TOKEN_ENV = "AION_ADMIN_TOKEN"
TOKEN_FILE_ENV = "AION_ADMIN_TOKEN_FILE"
MIN_TOKEN_CHARS = 16


class TokenFileError(ValueError):
    pass


def read_admin_tokens(path: str) -> list[tuple[str, str]]:
    """[(who, token)] from the file (see the module docstring)."""
    out: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for ln in f:
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            parts = ln.split(None, 1)
            who, token = ("admin", parts[0]) if len(parts) == 1 else (parts[0][:64], parts[1].strip())
            if len(token) < MIN_TOKEN_CHARS:
                raise TokenFileError(f"{path}: an admin token must have at least {MIN_TOKEN_CHARS} characters")
            out.append((who, token))
    if not out:
        raise TokenFileError(f"{path}: no admin token in the file")
    return out


def tokens_from(path: str | None) -> list[tuple[str, str]]:
    """The file given, else $AION_ADMIN_TOKEN_FILE, else $AION_ADMIN_TOKEN; [] when none."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if path:
        return read_admin_tokens(path)
    tok = os.environ.get(TOKEN_ENV, "").strip()
    if tok:
        if len(tok) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"${TOKEN_ENV}: an admin token must have at least {MIN_TOKEN_CHARS} characters")
        return [("admin", tok)]
    return []


@dataclass
class Session:
    sid: str
    who: str
    csrf: str
    created: float
    expires: float
    client: str


class Auth:
    def __init__(self, tokens: list[tuple[str, str]], ttl: float = 8 * 3600, clock=time.time):
        self._tokens = [(w, t.encode("utf-8")) for w, t in tokens]
        self.ttl = float(ttl)
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check_token(self, given: str) -> str | None:
        """Who the token belongs to, or None (every configured token is compared)."""
        g = given.encode("utf-8") if isinstance(given, str) else b""
        who = None
        for w, t in self._tokens:
            if hmac.compare_digest(g, t) and who is None:
                who = w
        return who

    # ---- failed logins: each recent failure from a client doubles the wait of the next answer
    def failure_delay(self, client: str) -> float:
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < 600]
            self._failures[client] = recent
        return 0.0 if not recent else min(0.1 * 2 ** (len(recent) - 1), 5.0)

    def too_many_failures(self, client: str) -> bool:
        now = self.clock()
        with self._lock:
            return sum(1 for t in self._failures.get(client, []) if now - t < 600) >= 30

    def record_failure(self, client: str) -> None:
        with self._lock:
            self._failures.setdefault(client, []).append(self.clock())

    def clear_failures(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    # ---- sessions
    def new_session(self, who: str, client: str) -> Session:
        now = self.clock()
        s = Session(secrets.token_urlsafe(32), who, secrets.token_urlsafe(32), now, now + self.ttl, client)
        with self._lock:
            for k in [k for k, v in self._sessions.items() if v.expires <= now]:
                del self._sessions[k]
            self._sessions[s.sid] = s
        return s

    def session(self, sid: str | None) -> Session | None:
        if not sid or not self.enabled:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if s.expires <= self.clock():
                del self._sessions[sid]
                return None
            return s

    def end(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode("utf-8"), session.csrf.encode("utf-8"))
