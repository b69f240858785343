"""The parsed `serve` arguments -> (FastAPI app, Service, AuditLog): the one place the server
is put together, by `aion-train serve`, by each Ray Serve replica (ray_deployment.py) and by
the tests. Heavy imports happen inside `build_server`."""

from __future__ import annotations


def read_api_keys(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path}: no API keys in the file")
    return keys


def build_server(args):
    """(app, service, audit) from the parsed arguments (also used by tests)."""
    from aion_train.policy import PolicySet
    from aion_train.serve.audit import AuditLog
    from aion_train.serve.loading import load_for_serving
    from aion_train.serve.openai_api import create_app
    from aion_train.serve.service import Service

    policies = PolicySet.load(args.policy) if args.policy else PolicySet.default_only()
    keys = read_api_keys(args.api_key_file) if args.api_key_file else None
    loaded = load_for_serving(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, model_id=args.model_name)
    service = Service(
        loaded,
        policies,
        max_batch=args.max_batch,
        threads=getattr(args, "threads", None),
        engine=getattr(args, "engine", None),
    )
    poll = getattr(args, "policy_poll", 0.0) or 0.0
    if args.policy and poll > 0:
        from aion_train.serve.policy_reload import PolicyWatcher

        service.policy_watcher = PolicyWatcher(service, poll)
    audit = AuditLog(args.audit_log) if args.audit_log else None
    retrieval = None
    if getattr(args, "index", None):
        if loaded.multimodal:
            raise ValueError("--index is not supported with a multimodal checkpoint (retrieval is for text models)")
        from aion_train.retrieval.hybrid import lm_loglik
        from aion_train.serve.retrieval_context import RetrievalContext

        scorer = lm_loglik(loaded.model, loaded.tokenizer, max_len=loaded.max_seq_len)  # for rerank requests
        retrieval = RetrievalContext(args.index, args.k, scorer=scorer)
    admin, tokens = None, []
    if hasattr(args, "admin_token_file"):  # `serve` and the tests; not the Ray Serve replicas
        from aion_train.admin.auth import tokens_from

        tokens = tokens_from(args.admin_token_file)  # the file, else $AION_ADMIN_TOKEN_FILE / $AION_ADMIN_TOKEN
    if tokens:
        if not args.policy:
            raise ValueError("the admin dashboard (--admin-token-file) needs --policy: the bundle it publishes")
        from aion_train.admin import AdminSite

        admin = AdminSite(args.policy, tokens)
    app = create_app(
        service,
        api_keys=keys,
        audit=audit,
        max_body_bytes=args.max_body_bytes,
        retrieval=retrieval,
        allow_unauthenticated_admin=bool(getattr(args, "allow_unauthenticated_admin", False)),
        admin=admin,
    )
    return app, service, audit
