"""The audit log under crashes: fsync in batches (by count and by time), a killed writer
loses nothing it wrote, a torn tail (a record cut anywhere, or zeros where the file grew
without its data) is reported as such with every earlier record verifying, and `audit
repair` cuts only a torn tail off so the chain continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from aion_train.cli import main
from aion_train.serve import audit as audit_mod
from aion_train.serve.audit import AuditError, AuditLog, repair, verify


def _fill(path, n, **kw):
    log = AuditLog(path, **kw)
    recs = [log.append({"request_id": f"r{i}", "completion_tokens": i, "actions": {}}) for i in range(n)]
    log.close()
    return recs


def test_fsync_runs_in_batches_by_count_and_by_time(tmp_path, monkeypatch):
    calls = []
    real = audit_mod.fsync_file
    monkeypatch.setattr(audit_mod, "fsync_file", lambda fd: (calls.append(time.monotonic()), real(fd)))
    log = AuditLog(tmp_path / "a.jsonl", fsync_every=4, fsync_interval=3600)
    for i in range(10):
        log.append({"request_id": f"r{i}"})
    assert len(calls) == 2  # after records 4 and 8
    log.close()
    assert len(calls) == 3  # the last 2 on close
    calls.clear()
    log = AuditLog(tmp_path / "b.jsonl", fsync_every=1000, fsync_interval=0.05)
    log.append({"request_id": "x"})
    t0 = time.monotonic()
    while not calls and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert calls, "the timer did not fsync the unsynced record"
    n = len(calls)
    time.sleep(0.2)
    assert len(calls) == n  # nothing new written: no more fsyncs
    log.close()


@pytest.mark.parametrize("tail", ["cut", "zeros", "cut+zeros"])
def test_a_torn_tail_is_reported_and_every_earlier_record_verifies(tmp_path, tail, capsys):
    path = tmp_path / "audit.jsonl"
    recs = _fill(path, 6)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    good = b"".join(lines[:5])
    last = lines[5]
    cuts = range(1, len(last)) if tail == "cut" else [len(last) // 2]
    for cut in cuts:
        torn = last[:cut] if tail == "cut" else b"\0" * 4096 if tail == "zeros" else last[:cut] + b"\0" * 100
        path.write_bytes(good + torn)
        res = verify(path)
        assert not res.ok and res.torn_tail and res.bad_line == 6, (cut, res)
        assert res.records == 5 and res.head == recs[4]["sha256"] and res.good_bytes == len(good)
    with pytest.raises(AuditError, match="audit repair"):
        AuditLog(path)
    assert main(["audit", "verify", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["torn_tail"] is True and out["records"] == 5 and out["bad_line"] == 6
    assert main(["audit", "repair", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 5 and rep["torn_bytes"] == len(torn)
    assert open(rep["saved_to"], "rb").read() == torn
    assert path.read_bytes() == good
    log = AuditLog(path)  # the chain continues from the last good record
    assert log.append({"request_id": "after"})["prev_sha256"] == recs[4]["sha256"]
    log.close()
    assert verify(path).ok and verify(path).records == 6


def test_repair_refuses_anything_but_a_torn_tail(tmp_path):
    path = tmp_path / "audit.jsonl"
    _fill(path, 4)
    lines = path.read_bytes().splitlines(keepends=True)
    edited = lines[1].replace(b'"completion_tokens":1', b'"completion_tokens":7')
    path.write_bytes(lines[0] + edited + b"".join(lines[2:]) + lines[3][:10])
    before = path.read_bytes()
    res = verify(path)
    assert not res.ok and not res.torn_tail and res.bad_line == 2
    with pytest.raises(AuditError, match="not a torn tail"):
        repair(path)
    assert path.read_bytes() == before
    ok = tmp_path / "ok.jsonl"
    _fill(ok, 2)
    assert repair(ok).torn_bytes == 0


WRITER = """
import sys, time
from aion_train.serve.audit import AuditLog
log = AuditLog(sys.argv[1], fsync_every=8, fsync_interval=0.02)
i = 0
while True:
    log.append({"request_id": f"r{i}", "pad": "x" * (i % 700), "actions": {}})
    i += 1
    if i == 50:
        print("writing", flush=True)
"""


def test_a_killed_writer_leaves_a_log_that_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    for round_ in range(3):  # each round appends to the log the round before left
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert proc.stdout.readline().strip() == "writing"
            time.sleep(0.1 + 0.07 * round_)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        res = verify(path)
        # SIGKILL cannot tear a write(2) of one line into a regular file: what was written stays
        assert res.ok, res
        assert res.records >= 50 * (round_ + 1)
