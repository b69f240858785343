"""Build a data folder once: idempotent, crash-safe, safe for concurrent callers.

The set is built into a temporary sibling folder and moved into place under a file lock.
A folder of ours that is incomplete or was built with other arguments is rebuilt: the
entries the build writes replace those it wrote before, and everything else in the folder
(e.g. the multimodal set in ``data/demo/multimodal`` next to the text demo, a user's notes)
stays. A non-empty folder that is not ours is refused (:mod:`aion_train.ownership`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from ..ownership import check_writable, publish_dir

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


def ensure_built(
    data_dir: str,
    is_complete: Callable[[str], bool],
    build: Callable[[str], object],
    what: str,
    overwrite: bool = False,
    recognise: Optional[Callable[[Path], bool]] = None,
    last: tuple = (),
) -> None:
    """Make ``is_complete(data_dir)`` true, calling ``build(tmp_dir)`` when it is not.

    Only a folder that is absent, empty or ours (:mod:`aion_train.ownership`; `recognise`
    accepts ours written before markers existed) is built or rebuilt; any other non-empty
    folder is refused before anything is built, unless `overwrite`."""
    data_dir = os.path.normpath(os.fspath(data_dir))
    if is_complete(data_dir):
        return
    check_writable(data_dir, what, overwrite, recognise)
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
                log.warning("%s: rebuilding %s (incomplete, or built with other settings)", what, data_dir)
            publish_dir(tmp, data_dir, what, overwrite=overwrite, recognise=recognise, last=last)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
