"""Prometheus metrics of the server (its own registry; `GET /metrics` renders it).

Label values are bounded: endpoints are the fixed routes, a jurisdiction label is one the
bundle defines or "unknown" (so a client cannot grow the label set), rule ids come from the
bundle.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RecentCounts:
    """Requests and policy actions per jurisdiction over the last `window` seconds, in
    `bucket`-second buckets (what the admin dashboard shows; Prometheus counters only go up)."""

    def __init__(self, window: float = 3600.0, bucket: float = 60.0, clock=time.time):
        self.window, self.bucket, self.clock = float(window), float(bucket), clock
        self._lock = threading.Lock()
        self._buckets: deque = deque()  # (bucket start, {j: {"requests": n, "actions": {rule: n}}})

    def _current(self) -> dict:
        now = self.clock()
        start = now - now % self.bucket
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append((start, {}))
        while self._buckets and self._buckets[0][0] <= now - self.window - self.bucket:
            self._buckets.popleft()
        return self._buckets[-1][1]

    def add(self, jurisdiction: str, requests: int = 0, actions: dict | None = None) -> None:
        with self._lock:
            e = self._current().setdefault(jurisdiction, {"requests": 0, "actions": {}})
            e["requests"] += requests
            for rule, a in (actions or {}).items():
                e["actions"][rule] = e["actions"].get(rule, 0) + a.get("matches", 1)

    def summary(self) -> dict:
        """{jurisdiction: {"requests": n, "actions": {rule: matches}, "policy_actions": total}}."""
        with self._lock:
            self._current()
            since = self.clock() - self.window
            out: dict = {}
            for start, per in self._buckets:
                if start + self.bucket <= since:
                    continue
                for j, e in per.items():
                    o = out.setdefault(j, {"requests": 0, "actions": {}, "policy_actions": 0})
                    o["requests"] += e["requests"]
                    for rule, n in e["actions"].items():
                        o["actions"][rule] = o["actions"].get(rule, 0) + n
                        o["policy_actions"] += n
            return out


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, jurisdictions=()):
        self.registry = CollectorRegistry(auto_describe=True)
        self.known = set(jurisdictions)
        r = self.registry
        self.requests = Counter(
            "aion_requests",
            "HTTP requests by endpoint, status and jurisdiction",
            ["endpoint", "status", "jurisdiction"],
            registry=r,
        )
        self.prompt_tokens = Counter("aion_prompt_tokens", "prompt tokens processed", ["endpoint"], registry=r)
        self.completion_tokens = Counter("aion_completion_tokens", "tokens generated", ["endpoint"], registry=r)
        self.latency = Histogram(
            "aion_request_latency_seconds",
            "request latency (to the last byte)",
            ["endpoint", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "aion_time_to_first_token_seconds",
            "time to the first generated token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "aion_time_to_first_byte_seconds",
            "streaming: time to the first byte of output text sent, by policy (a jurisdiction whose "
            "policy holds the whole output sends it only when generation ends)",
            ["endpoint", "jurisdiction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_actions = Counter(
            "aion_policy_actions",
            "policy actions (matches) by jurisdiction and rule",
            ["jurisdiction", "rule", "action"],
            registry=r,
        )
        self.blocked = Counter(
            "aion_policy_blocked_choices", "choices replaced by the refusal notice", ["jurisdiction"], registry=r
        )
        self.in_flight = Gauge("aion_requests_in_flight", "requests being served", registry=r)
        self.engine_jobs = Gauge(
            "aion_engine_jobs", "generation jobs submitted and not finished (queued or running)", registry=r
        )
        self.batch_rows = Histogram(
            "aion_batch_rows", "rows per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.media_cache = Counter(
            "aion_media_cache_lookups",
            "encoded media looked up by content hash (hit: reused; miss: encoded now)",
            ["kind", "result"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "aion_policy_reloads",
            "policy bundle reloads (ok: validated and served; failed: refused, the running bundle stays)",
            ["result"],
            registry=r,
        )
        for result in ("ok", "failed"):
            self.policy_reloads.labels(result)
        self.policy_bundle = Info("aion_policy_bundle", "the policy bundle served now", registry=r)
        self.recent = RecentCounts()

    def set_bundle(self, bundle_sha256: str, jurisdictions) -> None:
        """The bundle served now (after start-up or a reload): its hash as an info metric, and
        its jurisdictions as the known label values."""
        self.known = set(jurisdictions)
        self.policy_bundle.info({"bundle_sha256": bundle_sha256})

    def jurisdiction_label(self, j: str | None) -> str:
        if j is None:
            return "none"
        return j if j in self.known else "unknown"

    def observe_request(self, endpoint: str, status: int, jurisdiction: str | None) -> None:
        j = self.jurisdiction_label(jurisdiction)
        self.requests.labels(endpoint, str(status), j).inc()
        self.recent.add(j, requests=1)

    def observe_ttfb(self, endpoint: str, jurisdiction: str, seconds: float) -> None:
        self.ttfb.labels(endpoint, self.jurisdiction_label(jurisdiction)).observe(max(0.0, seconds))

    def observe_actions(self, jurisdiction: str, actions: dict) -> None:
        j = self.jurisdiction_label(jurisdiction)
        if actions:
            self.recent.add(j, actions=actions)
        for rule, a in actions.items():
            self.policy_actions.labels(j, rule, a["action"]).inc(a.get("matches", 1))
            if a["action"] == "block":
                self.blocked.labels(j).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
