"""bench serve: `aion-train serve` over loopback HTTP against `transformers`' `generate` on the
same weights exported to HF format, side by side in one run.

Our side is the real server (Service + the FastAPI app under uvicorn on 127.0.0.1) with C
concurrent clients in another process, each sending its requests one after the other as
streamed completions (token-id prompts, greedy, `max_tokens` new tokens, no stop). The
reference generates the same prompts with `MixtralForCausalLM.generate`, C sequences per
batch, exactly `max_tokens` new tokens each, in bf16 and (as `hf_fp32_*`) with the same
weights in fp32. Rounds interleave them at every C, and a ratio is the median of the
per-round ratios (`timing.paired_ratio`). The server's engine computes on `engine_threads`
(the serving policy: on the CPU its own process with every core, engine_process.py);
`transformers` runs in its own process too, so neither side's thread pool can slow the other
(docs/notes.md).

The weights are random (seeded). The served tokenizer is a small SentencePiece model trained
on the packaged demo texts; it only turns generated ids into text (prompts are ids), and
ids past its vocabulary are never sampled (the logits are still computed over the model's
whole vocabulary, so the work is the same as with a full-size tokenizer). No eos: every
request runs to `max_tokens`, which the bench checks."""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from .timing import paired_ratio

# the mid-size config of the serving issue: 113M parameters
MID_MODEL = [
    "model.vocab_size=32000",
    "model.d_model=512",
    "model.n_layers=6",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.moe.n_experts=8",
    "model.moe.top_k=2",
    "model.moe.d_ff_expert=1024",
    "model.max_seq_len=512",
    "model.tie_embeddings=false",
]
CLIENTS = (1, 8, 32)
REQUESTS_PER_CLIENT = {1: 2, 8: 1, 32: 1}
POLICY_JURISDICTION = "eu-de"
TOKENIZER_VOCAB = 2048
QUICK = {"mid": False, "rounds": 2, "clients": (1, 4), "prompt_tokens": 16, "new_tokens": 8, "policy_clients": 4}


def _config(mid: bool, config: str | None):
    from aion_train.config import load_config

    from .train import _config_path

    return load_config(_config_path(config), MID_MODEL if mid else [])


def _hf_folder(cfg, model, dtype: torch.dtype, folder: Path) -> str:
    """Our weights written as an HF Mixtral folder (read by the transformers process)."""
    from aion_train.interop.hf_mixtral import write_hf_folder

    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    folder.mkdir()
    write_hf_folder(cfg, sd, folder, dtype=dtype)
    return str(folder)


def _loaded(model, cfg, tokenizer_path: str):
    from aion_train.data.demo import demo_documents
    from aion_train.data.tokenizer import Tokenizer, train_tokenizer
    from aion_train.serve.loading import LoadedModel

    train_tokenizer(demo_documents(), tokenizer_path, min(TOKENIZER_VOCAB, cfg.vocab_size))
    return LoadedModel(
        model=model,
        tokenizer=Tokenizer(tokenizer_path),
        kind="pretrain",
        checkpoint="<random weights>",
        model_id="bench-serve",
        max_seq_len=cfg.max_seq_len,
        dtype="bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32",
        chat=False,
        eos_ids=(),
    )


class _LoopbackServer:
    """uvicorn on 127.0.0.1 (a free port) in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the bench server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class _Worker:
    """A spawned process (no torch state shared with the server) answering jobs over a Pipe:
    the clients (serve_clients.client_worker) or transformers (serve_hf.hf_worker)."""

    def __init__(self, target, *args, ready: bool = False):
        self.target, self.args, self.ready = target, args, ready

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=self.target, args=(child, *self.args), daemon=True)
        self.proc.start()
        if self.ready:  # the worker says when it has loaded
            self._answer()
        return self

    def _answer(self):
        if not self.conn.poll(600):
            raise RuntimeError(f"bench serve: the {self.target.__name__} process did not answer")
        status, out = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"bench serve, {self.target.__name__}: {out}")
        return out

    def run(self, **job):
        self.conn.send(job)
        return self._answer()

    def __exit__(self, *exc):
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def _served(clients: _Worker, url, prompts, c, per_client, new_tokens, jurisdiction=None) -> dict:
    body = {
        "model": "bench-serve",
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if jurisdiction:
        body["jurisdiction"] = jurisdiction
    out = clients.run(base_url=url, prompts=prompts, clients=c, per_client=per_client, body=body)
    reqs = out["requests"]
    bad = [r for r in reqs if r["tokens"] != new_tokens or r["finish"] != "length"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(reqs)} requests did not generate {new_tokens} tokens: {bad[0]}")
    return {
        "tokens_per_s": sum(r["tokens"] for r in reqs) / out["wall_s"],
        "ttft_ms": [r["chunk_s"][0] * 1e3 for r in reqs if r["chunk_s"]],
        "itl_ms": [(b - a) * 1e3 for r in reqs for a, b in zip(r["chunk_s"], r["chunk_s"][1:])],
    }


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_bench(
    config: str | None = None,
    mid: bool = True,
    rounds: int = 3,
    clients=CLIENTS,
    requests: dict | None = None,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    policy_clients: int = 8,
    threads: int | None = None,
    dtype: str = "bf16",
    seed: int = 0,
    compare_fp32: bool = True,
) -> dict:
    from aion_train.model import build_model
    from aion_train.policy import PolicySet, build_bundle
    from aion_train.serve.openai_api import create_app
    from aion_train.serve.service import Service

    from .serve_clients import client_worker
    from .serve_hf import hf_worker

    if threads:
        torch.set_num_threads(threads)
    clients = tuple(int(c) for c in clients)
    per_client = {c: (requests or REQUESTS_PER_CLIENT).get(c, 1) for c in clients}
    cfg = _config(mid, config).model
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = build_model(cfg, seed=seed).eval().to(torch_dtype)
    params = sum(p.numel() for p in model.parameters())
    policy_files = sorted((Path(__file__).resolve().parents[2] / "configs" / "policies").glob("*.json"))
    policies = PolicySet(build_bundle(policy_files))
    gen = torch.Generator().manual_seed(seed)
    vocab = min(TOKENIZER_VOCAB, cfg.vocab_size)
    n_prompts = max(c * per_client[c] for c in (*clients, policy_clients))
    prompts = torch.randint(4, vocab, (n_prompts, prompt_tokens), generator=gen).tolist()

    with tempfile.TemporaryDirectory(prefix="aion-bench-serve-") as tmp:
        folders = {"hf": (_hf_folder(cfg, model, torch_dtype, Path(tmp) / "hf"), dtype)}
        # the same bf16 weights computed in fp32 by transformers: where the CPU has no native
        # bf16 matmul this is the faster way to run them there, shown beside the bf16 reference
        with_fp32 = compare_fp32 and dtype == "bf16"
        if with_fp32:
            folders["hf_fp32"] = (_hf_folder(cfg, model, torch.float32, Path(tmp) / "hf32"), "fp32")
        service = Service(_loaded(model, cfg, str(Path(tmp) / "tok.model")), policies, max_batch=max(clients))
        app = create_app(service)
        service.scheduler.start()
        samples: dict = {k: {c: [] for c in clients} for k in ("ours", "hf", "hf_fp32")}
        ttft: dict = {c: [] for c in clients}
        itl: dict = {c: [] for c in clients}
        policy_rounds: dict = {"default": [], POLICY_JURISDICTION: []}
        try:
            with (
                _LoopbackServer(app) as server,
                _Worker(client_worker) as cl,
                _Worker(hf_worker, folders, torch.get_num_threads(), ready=True) as hfw,
            ):

                def hf_run(name, c, n):
                    return hfw.run(model=name, prompts=prompts, clients=c, per_client=n, new_tokens=new_tokens)

                for c in clients:  # warm-up: allocator, kernels, connections
                    _served(cl, server.url, prompts, c, 1, new_tokens)
                    for name in folders:
                        hf_run(name, c, 1)
                for _ in range(rounds):
                    for c in clients:
                        ours = _served(cl, server.url, prompts, c, per_client[c], new_tokens)
                        samples["ours"][c].append(ours["tokens_per_s"])
                        ttft[c] += ours["ttft_ms"]
                        itl[c] += ours["itl_ms"]
                        for name in folders:
                            samples[name][c].append(hf_run(name, c, per_client[c]))
                    pc = policy_clients
                    for jur in ("default", POLICY_JURISDICTION):
                        j = None if jur == "default" else jur
                        r = _served(cl, server.url, prompts, pc, per_client.get(pc, 1), new_tokens, j)
                        policy_rounds[jur].append(r["tokens_per_s"])
        finally:
            service.scheduler.stop()

    def per_c(fn) -> dict:
        return {str(c): fn(c) for c in clients}

    return {
        "tokens_per_s": per_c(lambda c: round(statistics.median(samples["ours"][c]), 1)),
        "hf_tokens_per_s": per_c(lambda c: round(statistics.median(samples["hf"][c]), 1)),
        "ratio_vs_hf": per_c(lambda c: round(paired_ratio(samples["ours"][c], samples["hf"][c]), 3)),
        "ttft_ms_p50": per_c(lambda c: round(_pct(ttft[c], 0.5), 2)),
        "ttft_ms_p99": per_c(lambda c: round(_pct(ttft[c], 0.99), 2)),
        "itl_ms_p50": per_c(lambda c: round(_pct(itl[c], 0.5), 2)),
        **(
            {
                "hf_fp32_tokens_per_s": per_c(lambda c: round(statistics.median(samples["hf_fp32"][c]), 1)),
                "ratio_vs_hf_fp32": per_c(lambda c: round(paired_ratio(samples["ours"][c], samples["hf_fp32"][c]), 3)),
            }
            if with_fp32
            else {}
        ),
        "policy_overhead": round(paired_ratio(policy_rounds[POLICY_JURISDICTION], policy_rounds["default"]), 3),
        "params": params,
        "policy_jurisdiction": POLICY_JURISDICTION,
        "policy_clients": policy_clients,
        "rounds_tokens_per_s": {
            "ours": per_c(lambda c: samples["ours"][c]),
            "hf": per_c(lambda c: samples["hf"][c]),
            **({"hf_fp32": per_c(lambda c: samples["hf_fp32"][c])} if with_fp32 else {}),
            "policy": policy_rounds,
        },
        "requests_per_client": per_c(lambda c: per_client[c]),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "engine_threads": service.scheduler.threads or torch.get_num_threads(),
        "d_model": cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab": vocab,
    }
