"""Policy hot reload: the served bundle is re-read when its file changes (polled) or when an
admin asks (`POST /admin/reload`, `Service.reload_policies`).

Either way the new bundle goes through `Service.reload_policies`: loaded, validated and
compiled before one assignment swaps it in; a request already running keeps the
`RequestPolicy` snapshot it resolved at its start; a broken bundle is refused (PolicyError,
logged, `aion_policy_reloads_total{result="failed"}`) and the running one stays.

The watcher polls `os.stat` of the served bundle's file every `interval` seconds and reloads
when its (inode, size, mtime) changes. Write a new bundle atomically (write a temporary file
in the same folder, then rename it over the old one, as `aion-train build-policy` does): a
file caught half written is refused like any broken bundle, and the next change of the file
is tried again.
"""

from __future__ import annotations

import logging
import os
import threading

from aion_train.policy import PolicyError

log = logging.getLogger(__name__)


def file_signature(path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class PolicyWatcher:
    def __init__(self, service, interval: float = 2.0):
        if interval <= 0:
            raise ValueError("the policy poll interval must be > 0 seconds")
        self.service = service
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = self._current()

    def _current(self):
        path = self.service.policies.path
        return None if path is None else (str(path), file_signature(path))

    def check(self) -> bool:
        """Reload if the served bundle's file changed since the last look; True when a new
        set is served."""
        now = self._current()
        if now is None or now == self._seen:
            return False
        self._seen = now
        if now[1] is None:
            log.error("policy bundle %s is gone; still serving %s", now[0], self.service.policies.bundle_sha256[:12])
            return False
        before = self.service.policies.bundle_sha256
        try:
            new = self.service.reload_policies(now[0])
        except PolicyError:
            return False  # reported by the service's listeners; the running set stays
        return new.bundle_sha256 != before

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                log.exception("policy watcher failed")

    def start(self) -> PolicyWatcher:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="aion-policy-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
