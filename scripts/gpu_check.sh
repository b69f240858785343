#!/usr/bin/env bash
# The prepared GPU check: one run on a machine with one CUDA GPU (sized for < 8 minutes on one
# H100/H200) that prints one JSON line per check. CPU CI never runs it (.ci/run does not, no
# test does; tests/test_bench_gpu.py only parses it with `bash -n`).
#
#   bash scripts/gpu_check.sh
#
# First line: {"check": "env", ...} with device, driver, torch, CUDA, flash-attn, Triton, faiss
# (and whether it is the GPU build), DeepSpeed, the grouped GEMM, and missing modules. Then:
#   pytest_gpu       python -m pytest -m gpu: the gpu-marked tests (Triton kernels compiled, fwd
#                    + bwd vs the torch references; flash-attn varlen vs SDPA with document
#                    masks; grouped GEMM; faiss GPU; a bf16 training step)
#   bench_gpu        aion-train bench gpu --json --write-docs (MFU of configs/gpu_1b_moe.yaml,
#                    attention TFLOP/s flash vs SDPA, each kernel vs its reference) into
#                    docs/benchmarks.md, a section for this device and date
#   pretrain_resume  the text demo (configs/tiny_cpu.yaml), bf16, 30 steps with evaluation and
#                    checkpoints; the same run stopped at step 15 (train.stop_at_step) and
#                    relaunched; the two loss histories compared (bitwise, as tests/test_train.py)
#   multimodal       configs/tiny_multimodal_cpu.yaml in bf16, 10 steps, on a small demo set
#   sft, rm, ppo     configs/rlhf_tiny.yaml shrunk to a few steps each, one PPO iteration
# and a last {"check": "summary", ...}. Every check runs in its own subshell under its own
# `timeout` (cut to what is left of GPU_CHECK_BUDGET_S); a check whose modules are missing
# prints {"check": name, "skipped": reason}. Exit code: 0 when no check failed, 1 otherwise,
# 2 without CUDA.
#
# It installs nothing unless GPU_CHECK_INSTALL=1 (then `pip install -e .[test,retrieval]`
# against the torch already there), and writes only into a new temporary folder (removed at
# the end unless GPU_CHECK_KEEP=1) and docs/benchmarks.md.
#
# Environment:
#   PYTHON              interpreter (default: python3, else python)
#   GPU_CHECK_BUDGET_S  seconds for all checks (default 470)
#   GPU_CHECK_ONLY      space-separated check names to run (default: all)
#   GPU_CHECK_INSTALL   1: pip install -e .[test,retrieval] first (needs a package index)
#   GPU_CHECK_KEEP      1: keep the work folder
#   GPU_CHECK_OUT       also copy results.jsonl, bench_gpu.json, docs/benchmarks.md and the
#                       logs of failed checks into this folder (default: $OUT when set)
#   GPU_CHECK_ALLOW_CPU 1: run the training checks without CUDA (to try this script on a CPU
#                       box; bench_gpu is then skipped)
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
ONLY=${GPU_CHECK_ONLY:-}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-}}
RESERVE=5
START=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/aion-gpu-check.XXXXXX") || { echo '{"check": "setup", "ok": false, "error": "mktemp failed"}'; exit 1; }
RESULTS="$WORK/results.jsonl"
HELPER="$WORK/helper.py"
: > "$RESULTS"

# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
    if [ -n "$OUT_DIR" ]; then
        mkdir -p "$OUT_DIR" 2>/dev/null && {
            cp "$RESULTS" "$OUT_DIR/gpu_check.jsonl" 2>/dev/null
            [ -f "$WORK/bench_gpu.json" ] && cp "$WORK/bench_gpu.json" "$OUT_DIR/" 2>/dev/null
            [ -f "$REPO/docs/benchmarks.md" ] && cp "$REPO/docs/benchmarks.md" "$OUT_DIR/benchmarks.md" 2>/dev/null
            for f in "$WORK"/*.failed.log; do
                [ -f "$f" ] && tail -c 200000 "$f" > "$OUT_DIR/$(basename "$f")" 2>/dev/null
            done
        }
    fi
    if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then
        echo "gpu_check: work folder kept: $WORK" >&2
    elif [ -n "$WORK" ] && [ -d "$WORK" ]; then
        rm -rf -- "$WORK"          # only the folder mktemp made for this run
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_REPO="$REPO" GPU_CHECK_WORK="$WORK"
unset MLFLOW_TRACKING_URI

# ------------------------------------------------------------------------------------------
# the checks themselves (Python); this script only times, bounds and reports them
# ------------------------------------------------------------------------------------------
cat > "$HELPER" <<'PYEOF'
import glob, json, os, shutil, sqlite3, subprocess, sys, time

REPO, WORK = os.environ["GPU_CHECK_REPO"], os.environ["GPU_CHECK_WORK"]
CORE = ["torch", "numpy", "yaml", "deepspeed", "mlflow", "sentencepiece", "webdataset", "safetensors",
        "tqdm", "jsonschema", "matplotlib", "aion_train.cli"]
NEEDS = {"pretrain_resume": CORE, "multimodal": CORE + ["PIL", "easy_vqa", "chatterbot_corpus", "sklearn"],
         "sft": CORE + ["easy_vqa", "chatterbot_corpus"], "rm": CORE + ["easy_vqa", "chatterbot_corpus"],
         "ppo": CORE + ["easy_vqa", "chatterbot_corpus"], "pytest_gpu": ["pytest", "torch", "aion_train"],
         "bench_gpu": ["torch", "yaml", "aion_train.cli"], "install": []}


def missing(mods):
    import importlib
    out = []
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as e:
            out.append(f"{m} ({type(e).__name__})")
    return out


def cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def details(name, d):
    with open(os.path.join(WORK, name + ".details.json"), "w") as f:
        json.dump(d, f)


def aion(args, cwd=WORK, timeout=None):
    """`aion-train ARGS`; (returncode, the last JSON line of stdout or None, stderr tail)."""
    # stderr straight into this check's log (live: a timed-out check still shows how far it got)
    sys.stderr.write(f"$ aion-train {' '.join(args)}\n")
    sys.stderr.flush()
    p = subprocess.run([sys.executable, "-m", "aion_train.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                       stderr=None, text=True, timeout=timeout)
    summary = None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
                break
            except ValueError:
                pass
    if p.returncode != 0 or summary is None:
        raise RuntimeError(f"aion-train {' '.join(args[:1])} exited {p.returncode} (its stderr is above)")
    return summary


def losses(run_dir):
    db = sqlite3.connect(os.path.join(run_dir, "mlflow.db"))
    try:
        return [(int(s), v) for s, v in db.execute(
            "SELECT step, value FROM metrics WHERE key = 'train/loss' ORDER BY step, timestamp")]
    finally:
        db.close()


# ------------------------------------------------------------------ env
def check_env():
    import platform
    out = {"check": "env", "python": platform.python_version(), "repo": REPO}
    try:
        import torch
        out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                       memory_gb=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                       bf16=torch.cuda.is_bf16_supported())
        import torch.nn.functional as F
        out["grouped_mm_api"] = hasattr(F, "grouped_mm")
        try:
            from aion_train.bench.gpu import grouped_mm_bf16
            out["grouped_mm_bf16"], out["grouped_mm_why"] = grouped_mm_bf16(
                "cuda" if torch.cuda.is_available() else "cpu")
        except Exception as e:
            out["grouped_mm_bf16"] = f"unknown ({type(e).__name__}: {e})"
    except Exception as e:
        out["torch"] = f"not importable ({type(e).__name__}: {e})"
    for mod, key in (("flash_attn", "flash_attn"), ("triton", "triton"), ("deepspeed", "deepspeed"),
                     ("faiss", "faiss"), ("transformers", "transformers"), ("mlflow", "mlflow")):
        try:
            m = __import__(mod)
            out[key] = getattr(m, "__version__", "unknown")
            if mod == "faiss":
                out["faiss_gpu"] = bool(hasattr(m, "StandardGpuResources") and m.get_num_gpus() > 0)
        except Exception as e:
            out[key] = None
            out.setdefault("not_installed", []).append(f"{mod} ({type(e).__name__})")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else smi.stderr.strip()[-300:]
    except Exception as e:
        out["nvidia_smi"] = f"not available ({type(e).__name__})"
    miss = sorted({m for mods in NEEDS.values() for m in missing(mods)})
    out["missing_modules"] = miss
    print(json.dumps(out))


# ------------------------------------------------------------------ pretrain + exact resume
def check_pretrain_resume():
    base = os.path.join(WORK, "pretrain")
    cfg = os.path.join(REPO, "configs", "tiny_cpu.yaml")
    common = ["--config", cfg, f"data.dir={base}/data", "train.steps=30", "train.eval_every=15",
              "train.save_every=15", "train.eval_batches=2", "train.precision=bf16", "--json"]
    t0 = time.time()
    ref = aion(["pretrain", *common, f"run_dir={base}/uninterrupted"])
    first = aion(["pretrain", *common, f"run_dir={base}/resumed", "train.stop_at_step=15"])
    shutil.copytree(f"{base}/resumed", f"{base}/resumed_again", symlinks=True)
    second = aion(["pretrain", *common, f"run_dir={base}/resumed"])
    want, got = losses(f"{base}/uninterrupted"), losses(f"{base}/resumed")
    d = {"steps": len(want), "final_loss": round(want[-1][1], 5) if want else None,
         "final_val_ppl": ref.get("final_val_ppl"), "initial_val_ppl": ref.get("initial_val_ppl"),
         "first_stop_step": first.get("final_step"), "resumed_final_step": second.get("final_step"),
         "checkpoint": os.path.basename(str(second.get("checkpoint"))), "run_seconds": round(time.time() - t0, 1),
         "same_mlflow_run": first.get("mlflow_run_id") == second.get("mlflow_run_id")}
    steps_ok = [s for s, _ in want] == list(range(1, 31)) and [s for s, _ in got] == list(range(1, 31))
    d["exact_resume"] = exact = steps_ok and want == got and ref.get("final_val_ppl") == second.get("final_val_ppl")
    diffs = [abs(a[1] - b[1]) for a, b in zip(want, got)]
    d["max_abs_loss_diff"] = max(diffs) if diffs else None
    d["first_differing_step"] = next((a[0] for a, b in zip(want, got) if a != b), None)
    ok = exact
    if not exact and steps_ok:
        # GPU kernels with atomics (index_add, flash-attn's backward) are not bitwise
        # reproducible run to run. Resume the same checkpoint a second time: the state it
        # restores must give the same first resumed step, bit for bit.
        again = aion(["pretrain", *common, f"run_dir={base}/resumed_again"])
        got2 = losses(f"{base}/resumed_again")
        d["same_checkpoint_step16_equal"] = bool(got2 and got and dict(got2).get(16) == dict(got).get(16))
        rel = max(diffs) / max(abs(v) for _, v in want)
        d["max_rel_loss_diff"] = rel
        d["resume_mode"] = "same-checkpoint reproducible, run-to-run within 1%"
        ok = d["same_checkpoint_step16_equal"] and rel < 1e-2 and again.get("final_step") == 30
    else:
        d["resume_mode"] = "bitwise" if exact else "steps missing"
    d["ok"] = bool(ok and ref.get("final_step") == 30 and first.get("final_step") == 15 and d["same_mlflow_run"])
    details("pretrain_resume", d)
    return 0 if d["ok"] else 1


# ------------------------------------------------------------------ multimodal
def check_multimodal():
    from aion_train.data.multimodal import build as mm
    speech = shutil.which("espeak-ng") is not None
    sizes = {"vqa_train": 64, "vqa_val": 16, "digits_train": 32, "digits_val": 8, "photo_crops": 1,
             "speech_train": 8 if speech else 0, "speech_val": 2 if speech else 0, "video_train": 16,
             "video_val": 4, "text_train": 40, "text_val": 8}
    t0 = time.time()
    paths = mm.build_multimodal_demo(os.path.join(WORK, "mm_data"), 400, seed=7, sizes=sizes, samples_per_shard=16)
    build_s = round(time.time() - t0, 1)
    out = aion(["pretrain", "--config", os.path.join(REPO, "configs", "tiny_multimodal_cpu.yaml"),
                f"run_dir={WORK}/multimodal", f"data.train_shards={os.path.dirname(paths['train'][0])}/mm_train-*.tar",
                f"data.val_shards={os.path.dirname(paths['val'][0])}/mm_val-*.tar", f"data.tokenizer={paths['tokenizer']}",
                "data.micro_batch_size=4", "train.steps=10", "train.eval_every=10", "train.eval_batches=1",
                "train.save_every=10", "train.warmup_steps=2", "train.precision=bf16", "--json"])
    ls = losses(f"{WORK}/multimodal")
    import math
    d = {"final_step": out.get("final_step"), "final_loss": round(ls[-1][1], 5) if ls else None,
         "first_loss": round(ls[0][1], 5) if ls else None, "final_val": out.get("final_val"),
         "skipped_samples": out.get("skipped_samples"), "data_build_seconds": build_s,
         "speech": "espeak-ng" if speech else "none (espeak-ng not installed)"}
    d["ok"] = bool(out.get("final_step") == 10 and ls and all(math.isfinite(v) for _, v in ls))
    details("multimodal", d)
    return 0 if d["ok"] else 1


# ------------------------------------------------------------------ sft, rm, ppo
POST = ["sft.base_steps=40", "sft.steps=10", "sft.eval_examples=24", "sft.chat_examples=20", "sft.max_examples=200",
        "sft.batch_size=16", "rm.steps=10", "rm.train_pairs=100", "rm.eval_pairs=20", "rm.batch_size=16",
        "ppo.steps=1", "ppo.rollout_prompts=8", "ppo.minibatches=2", "ppo.save_every=1", "tracking.enabled=false"]


def check_phase(phase, headline):
    import math
    out = aion([phase, "--config", os.path.join(REPO, "configs", "rlhf_tiny.yaml"), f"run_dir={WORK}/posttrain",
                *POST, "--json"])
    d = {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool)) or v is None}
    val = out.get(headline)
    d["ok"] = isinstance(val, (int, float)) and math.isfinite(val)
    details(phase, d)
    return 0 if d["ok"] else 1


# ------------------------------------------------------------------ pytest -m gpu
def check_pytest_gpu():
    import re
    out_path = os.path.join(WORK, "pytest_gpu.stdout")
    with open(out_path, "w") as out:
        p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                            f"--basetemp={WORK}/pytest"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    p.stdout = open(out_path, errors="replace").read()
    sys.stderr.write(p.stdout[-60000:])
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    d = {"rc": p.returncode, "tests_passed": counts.get("passed", 0), "tests_failed": counts.get("failed", 0),
         "tests_errors": counts.get("error", 0) + counts.get("errors", 0), "tests_skipped": counts.get("skipped", 0),
         "summary": tail[-300:],
         "failed_tests": [ln.split(" ", 2)[1] for ln in p.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:30],
         "skip_reasons": sorted({ln.split(": ", 1)[-1][:120] for ln in p.stdout.splitlines()
                                 if ln.startswith("SKIPPED")})[:15]}
    on_cpu = not cuda()
    d["ok"] = (p.returncode == 0 and d["tests_failed"] == 0 and d["tests_errors"] == 0
               and (d["tests_passed"] > 0 or on_cpu))
    details("pytest_gpu", d)
    return 0 if d["ok"] else 1


# ------------------------------------------------------------------ bench gpu
def check_bench_gpu():
    p = subprocess.run([sys.executable, "-m", "aion_train.cli", "bench", "gpu", "--json", "--write-docs"],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=None, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        details("bench_gpu", {"ok": False, "rc": p.returncode})
        return 1
    r = json.loads(lines[-1])
    with open(os.path.join(WORK, "bench_gpu.json"), "w") as f:
        f.write(lines[-1] + "\n")
    tr = r.get("train", {})
    att = {row["seq_len"]: {k: row.get(k) for k in ("flash_fwd_bwd_tflops", "sdpa_fwd_bwd_tflops")}
           for row in r.get("attention", {}).get("rows", [])}
    ker = r.get("kernels", {})
    d = {"device": r.get("device"), "mfu": tr.get("mfu"), "tokens_per_s": tr.get("tokens_per_s"),
         "achieved_tflops": tr.get("achieved_tflops"), "peak_tflops": tr.get("peak_tflops"),
         "peak_source": tr.get("peak_source"), "params": tr.get("params"), "train_loss_last": tr.get("loss_last"),
         "attention_tflops_fwd_bwd": att, "flash_skipped": r.get("attention", {}).get("flash_skipped"),
         "kernel_speedups": {k: v.get("speedup") for k, v in ker.items() if isinstance(v, dict) and "speedup" in v},
         "kernel_max_rel_err": {k: v.get("max_rel_err") for k, v in ker.items() if isinstance(v, dict) and "speedup" in v},
         "kernels_skipped": ker.get("skipped"), "grouped_mm": r.get("grouped_mm", {}).get("speedup"),
         "docs": r.get("docs"), "bench_seconds": r.get("seconds")}
    errors = {part: r[part]["error"][-300:] for part in ("train", "attention", "kernels", "grouped_mm")
              if isinstance(r.get(part), dict) and "error" in r[part]}
    errors.update({f"kernel {k}": v["error"][-300:] for k, v in ker.items() if isinstance(v, dict) and "error" in v})
    if errors:
        d["errors"] = errors
    d["ok"] = bool(tr.get("mfu") and tr.get("loss_finite") and not errors and r.get("docs"))
    details("bench_gpu", d)
    return 0 if d["ok"] else 1


# ------------------------------------------------------------------ reporting
def emit(name, rc, seconds, log, limit):
    rc, seconds = int(rc), float(seconds)
    path = os.path.join(WORK, name + ".details.json")
    d = {}
    if os.path.isfile(path):
        try:
            d = json.load(open(path))
        except ValueError:
            d = {}
    line = {"check": name, "ok": bool(rc == 0 and d.get("ok", rc == 0)), "seconds": round(seconds, 1)}
    line.update({k: v for k, v in d.items() if k != "ok"})
    if rc in (124, 137):
        line["error"] = f"timed out after {limit} s"
    if not line["ok"]:
        text = ""
        for f in (log, os.path.join(WORK, name + ".stdout")):   # pytest's report, when it got that far
            try:
                text += open(f, errors="replace").read()[-4000:]
            except OSError:
                pass
        line["error_tail"] = text[-2000:]
        line.setdefault("rc", rc)
    print(json.dumps(line))
    return 0 if line["ok"] else 1


def skip(name, reason):
    print(json.dumps({"check": name, "skipped": reason}))


def needs(name):
    miss = missing(NEEDS.get(name, []))
    if miss:
        print("missing python modules: " + ", ".join(miss))
        return 3
    return 0


def summary(seconds):
    rows = [json.loads(ln) for ln in open(os.path.join(WORK, "results.jsonl")) if ln.strip()]
    rows = [r for r in rows if r.get("check") not in ("env", "summary")]
    out = {"check": "summary", "ok": all(r.get("ok", True) for r in rows), "seconds": round(float(seconds), 1),
           "passed": [r["check"] for r in rows if r.get("ok") is True],
           "failed": [r["check"] for r in rows if r.get("ok") is False],
           "skipped": [r["check"] for r in rows if "ok" not in r and "skipped" in r]}
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    # libraries that print to stdout (DeepSpeed's accelerator line) go to stderr: stdout
    # carries the JSON line only
    sys.stdout.flush()
    _json_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = _json_out
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "env":
        check_env()
    elif cmd == "cuda":
        sys.exit(0 if cuda() else 1)
    elif cmd == "needs":
        sys.exit(needs(args[0]))
    elif cmd == "emit":
        sys.exit(emit(*args))
    elif cmd == "skip":
        skip(*args)
    elif cmd == "summary":
        sys.exit(summary(*args))
    elif cmd == "pretrain_resume":
        sys.exit(check_pretrain_resume())
    elif cmd == "multimodal":
        sys.exit(check_multimodal())
    elif cmd in ("sft", "rm", "ppo"):
        sys.exit(check_phase(cmd, {"sft": "sft_accuracy", "rm": "rm_pair_accuracy", "ppo": "ppo_accuracy"}[cmd]))
    elif cmd == "pytest_gpu":
        sys.exit(check_pytest_gpu())
    elif cmd == "bench_gpu":
        sys.exit(check_bench_gpu())
    else:
        sys.exit(f"unknown helper command {cmd}")
PYEOF

report() {   # one JSON line on stdout and in results.jsonl; returns the helper's status
    local line rc
    line=$("$PY" "$HELPER" "$@" 2>/dev/null)
    rc=$?
    line=$(printf '%s\n' "$line" | grep '^{' | tail -n 1)
    if [ -z "$line" ]; then   # python itself is broken: still one line
        line="{\"check\": \"${2:-$1}\", \"ok\": false, \"error\": \"could not run $PY to report\"}"
        rc=1
    fi
    printf '%s\n' "$line" >> "$RESULTS"
    printf '%s\n' "$line"
    return "$rc"
}

wanted() {
    [ -z "$ONLY" ] && return 0
    case " $ONLY " in *" $1 "*) return 0 ;; esac
    return 1
}

# run_check NAME TIMEOUT_S COMMAND...: in a subshell under its own timeout, cut to the budget
run_check() {
    local name=$1 want=$2 left limit t0 rc log reason
    shift 2
    wanted "$name" || return 0
    log="$WORK/$name.log"
    if ! reason=$("$PY" "$HELPER" needs "$name" 2>/dev/null); then
        report skip "$name" "$(printf '%s' "${reason:-cannot check the modules it needs}" | tail -c 400)"
        return 0
    fi
    left=$(( BUDGET - (SECONDS - START) - RESERVE ))
    if [ "$left" -lt 20 ]; then
        report skip "$name" "time budget spent (GPU_CHECK_BUDGET_S=$BUDGET)"
        return 0
    fi
    limit=$(( want < left ? want : left ))
    t0=$SECONDS
    ( cd "$WORK" && exec timeout -k 10 "$limit" "$@" ) > "$log" 2>&1
    rc=$?
    if ! report emit "$name" "$rc" "$(( SECONDS - t0 ))" "$log" "$limit"; then
        cp "$log" "$WORK/$name.failed.log" 2>/dev/null
    fi
    return 0
}

# ------------------------------------------------------------------------------------------
report env

if [ "${GPU_CHECK_INSTALL:-0}" = 1 ]; then
    TORCH_PIN=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
    if [ -n "$TORCH_PIN" ]; then
        echo "torch==$TORCH_PIN" > "$WORK/torch-constraint.txt"
        t0=$SECONDS
        ( cd "$REPO" && DS_BUILD_OPS=0 exec timeout -k 10 600 "$PY" -m pip install -q -c "$WORK/torch-constraint.txt" \
              -e ".[test,retrieval]" ) > "$WORK/install.log" 2>&1
        rc=$?
        report emit install "$rc" "$(( SECONDS - t0 ))" "$WORK/install.log" 600 || cp "$WORK/install.log" "$WORK/install.failed.log"
        START=$SECONDS      # the budget is for the checks
    else
        report skip install "torch is not importable: install it (for this machine's CUDA) first"
    fi
fi

ON_CPU=0
if ! "$PY" "$HELPER" cuda 2>/dev/null; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        printf '%s\n' '{"check": "cuda", "ok": false, "error": "torch sees no CUDA device: this check needs a GPU (GPU_CHECK_ALLOW_CPU=1 runs the training checks on CPU)"}' | tee -a "$RESULTS"
        exit 2
    fi
    ON_CPU=1
fi

run_check pytest_gpu      150 "$PY" "$HELPER" pytest_gpu
if [ "$ON_CPU" = 1 ]; then
    wanted bench_gpu && report skip bench_gpu "no CUDA device (GPU_CHECK_ALLOW_CPU=1)"
else
    run_check bench_gpu   180 "$PY" "$HELPER" bench_gpu
fi
run_check pretrain_resume 200 "$PY" "$HELPER" pretrain_resume
run_check multimodal      120 "$PY" "$HELPER" multimodal
run_check sft             120 "$PY" "$HELPER" sft
run_check rm               90 "$PY" "$HELPER" rm
run_check ppo              90 "$PY" "$HELPER" ppo

report summary "$(( SECONDS - START ))" || exit 1
exit 0
