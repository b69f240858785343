"""Build a data folder once: idempotent, crash-safe, safe for concurrent callers.

The set is built into a temporary sibling folder and renamed into place under a file lock;
a folder that is incomplete or was built with other arguments is replaced. Entries of the
old folder that the new build does not produce (e.g. the multimodal set that lives in
``data/demo/multimodal`` next to the text demo) are moved into the new folder, not lost.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from typing import Callable

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: the temp-dir + rename still keeps the dir consistent
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def ensure_built(data_dir: str, is_complete: Callable[[str], bool], build: Callable[[str], object],
                 what: str) -> None:
    """Make ``is_complete(data_dir)`` true, calling ``build(tmp_dir)`` when it is not."""
    data_dir = os.path.normpath(os.fspath(data_dir))
    if is_complete(data_dir):
        return
    parent, name = os.path.dirname(os.path.abspath(data_dir)), os.path.basename(data_dir)
    os.makedirs(parent, exist_ok=True)
    with file_lock(os.path.join(parent, f".{name}.lock")):
        if is_complete(data_dir):  # built by a caller we waited for
            return
        for stale in os.listdir(parent):  # leftovers of builds that crashed (we hold the lock)
            if stale.startswith((f".{name}.tmp-", f".{name}.old-")):
                remove(os.path.join(parent, stale))
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            build(tmp)
            if os.path.lexists(data_dir):
                log.warning("%s: replacing incomplete or different %s", what, data_dir)
                if os.path.isdir(data_dir):
                    for entry in os.listdir(data_dir):
                        if os.path.isdir(os.path.join(data_dir, entry)) and not os.path.lexists(os.path.join(tmp, entry)):
                            os.replace(os.path.join(data_dir, entry), os.path.join(tmp, entry))
                old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(data_dir, old)
                os.replace(tmp, data_dir)
                remove(old)
            else:
                os.replace(tmp, data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
