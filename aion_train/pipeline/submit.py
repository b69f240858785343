"""`aion-train pipeline --address http://HEAD:8265`: the same pipeline as a Ray job.

Submits `aion-train pipeline --config F [k=v ...] [--json]` through the jobs API
(`ray.job_submission.JobSubmissionClient`, what `ray job submit` uses), then polls the job's
status and streams its log. Inside the job, Ray sets RAY_ADDRESS, so the pipeline's driver
joins that cluster instead of starting a private one. With --json the job's JSON lines go to
stdout (the same lines as a local run) and everything else in its log to stderr.

Files: by default the job `cd`s into this working directory first (a local head node or a
cluster with a shared filesystem see the same paths); `working_dir` uploads a folder instead
(runtime_env working_dir) for clusters that do not share one. Ctrl-C / SIGTERM stops the job.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def build_entrypoint(
    config: str | None, overrides: list[str], json_out: bool, working_dir: str | None = None, cwd: str | None = None
) -> str:
    """The job's shell command: `cd CWD && aion-train pipeline ...` (or, with working_dir,
    the command alone, with the config path relative to the uploaded folder)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    args = ["aion-train", "pipeline"]
    if config:
        path = os.path.abspath(config)
        if working_dir:
            rel = os.path.relpath(path, os.path.abspath(working_dir))
            if rel.startswith(".."):
                raise ValueError(f"--config {config} is outside --working-dir {working_dir}")
            path = rel
        args += ["--config", path]
    if json_out:
        args.append("--json")
    args += list(overrides)
    cmd = shlex.join(args)
    return cmd if working_dir else f"cd {shlex.quote(cwd)} && {cmd}"


def _split_lines(text: str, json_out: bool, out: Callable[[str], None], err: Callable[[str], None]) -> None:
    for line in text.splitlines():
        is_json = False
        if json_out and line.startswith("{"):
            try:
                is_json = isinstance(json.loads(line), dict)
            except ValueError:
                pass
        (out if is_json or not json_out else err)(line)


def submit_pipeline(
    address: str,
    config: str | None,
    overrides: list[str],
    *,
    json_out: bool = False,
    working_dir: str | None = None,
    wait: bool = True,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> int:
    """Submit the pipeline to the cluster whose dashboard is `address`; with `wait`, stream the
    job's log until it ends and return 0 (SUCCEEDED) or the driver's exit code (1 if unknown)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": working_dir} if working_dir else None
    entrypoint = build_entrypoint(config, overrides, json_out, working_dir)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"aion_train": "pipeline"})
    err(f"pipeline: submitted Ray job {job_id} to {address}: {entrypoint}")
    if not wait:
        out(json.dumps({"job_id": job_id, "address": address}) if json_out else job_id)
        return 0
    seen = 0
    buf = ""
    t0 = time.time()
    status = None
    try:
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            if len(logs) > seen:
                buf += logs[seen:]
                seen = len(logs)
                complete, _, buf = buf.rpartition("\n")
                if complete:
                    _split_lines(complete, json_out, out, err)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            if timeout_s is not None and time.time() - t0 > timeout_s:
                client.stop_job(job_id)
                err(f"pipeline: job {job_id} did not finish within {timeout_s:.0f} s; stopped it")
                return 1
            time.sleep(poll_s)
    except (KeyboardInterrupt, SystemExit):
        client.stop_job(job_id)
        err(f"pipeline: interrupted; stopped job {job_id}")
        raise
    if buf:
        _split_lines(buf, json_out, out, err)
    info = client.get_job_info(job_id)
    err(f"pipeline: job {job_id} {status}" + (f": {info.message}" if info.message else ""))
    if status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return int(code) if code else 1
