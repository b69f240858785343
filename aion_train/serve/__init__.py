"""Serving a trained checkpoint: `aion-train generate` and the OpenAI-compatible
`aion-train serve`, with per-jurisdiction output policies applied outside the model.

The model is served unrestricted under the default policy (outputs equal the raw model's,
token for token, for the same seed); under jurisdiction j every output is
`enforce(model(x), policy[j])`. Policies never touch the weights. An unknown jurisdiction is
refused (fails closed) unless the bundle declares a fallback.

    loading.py         checkpoint (pretrain / SFT / PPO, any TP/EP layout) -> model + tokenizer
    sampling.py        greedy / temperature / top-k / top-p, one random stream per choice
    engine.py          batched KV-cached generation (ragged prompts through segment ids)
    scheduler.py       the worker loop that owns the model; continuous batching of queued jobs
    engine_process.py  the scheduler in a process of its own (the CPU default): rows down, tokens back
    text.py            incremental detokenizing and stop strings
    policy_runtime.py  per-request policy snapshot, fail-closed lookup, streaming hold-back
    policy_reload.py   bundle hot reload: the file watcher (Service.reload_policies does the swap)
    choice.py          one choice: ids -> raw text -> enforced text (streamed or not)
    service.py         requests -> rows -> results; the `aion` response object
    protocol.py        request bodies (unknown fields refused) and OpenAI-shaped errors
    openai_api.py      the FastAPI app
    server.py          the parsed `serve` arguments -> app, service, audit log (one place)
    ray_deployment.py  the same app as a Ray Serve deployment (`serve --ray --replicas N`)
    audit.py           hash-chained JSONL audit log + verify
    metrics.py         Prometheus metrics (requests, tokens, latency, policy actions, reloads, open jobs)
                       and the last hour's counts per jurisdiction (RecentCounts, for the dashboard)

The admin dashboard (aion_train/admin) mounts under /admin through `create_app(admin=...)`.
"""
