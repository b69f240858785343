"""aion-train generate --checkpoint C ("prompt" | --token-ids '[ids]') [--chat] [--max-tokens N]
    [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop S]... [-n N]
    [--policy BUNDLE --jurisdiction J] [--index DIR --k K] [--json]
    [--image F.png]... [--audio F.wav]... [--video FRAME.png...]   (a multimodal checkpoint)

Generates from a checkpoint in this process (no server), through the same engine, sampling
and policy code as `aion-train serve`: the same request with the same seed gives the same
tokens and text. Without --policy (or without --jurisdiction) the default policy applies and
the output is the raw model's. --index puts the index's best --k chunks for the prompt (whole
chunks, as many as leave room for --max-tokens) before it as `<CTX> ... </CTX>`; `aion.retrieval`
names them. --chat renders PROMPT as one user message in the post-training
chat template (SFT/PPO checkpoints). --json prints one object
{"text", "token_ids" (the generated ids), "finish_reason", "aion": {...}}; without it the text.

A multimodal checkpoint: --image / --audio (16-bit PCM WAV) / --video (the frames of one clip,
image files) put their media before PROMPT as the server puts a chat message's content parts
(serve/mm_prompt.py): `<I> pad*R </I> ... <T> PROMPT`, the answer ending at `</T>`.

Exit codes: 0 ok; 2 bad arguments, unknown jurisdiction, prompt too long; 1 the checkpoint or
policy bundle cannot be loaded.
"""

from __future__ import annotations

import json
import sys


def add_model_arguments(p) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="C",
        help="a pretraining run / checkpoints folder / step folder, or an SFT/PPO run folder",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="MODEL",
        help="SentencePiece .model or tokenizer.json (default: found from the run)",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--model-name", default=None, help="the model id clients use (default: from the run folder)")


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text")
    p.add_argument("--token-ids", default=None, metavar="JSON", help="the prompt as a JSON list of token ids")
    p.add_argument("--chat", action="store_true", help="PROMPT is a user message in the chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens to generate (default: 16, or the rest of the context with --chat)",
    )
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("-n", type=int, default=1, help="number of choices")
    p.add_argument("--policy", default=None, metavar="BUNDLE", help="policy_bundle.json (or its folder)")
    p.add_argument("--jurisdiction", default=None, metavar="J", help="jurisdiction of the bundle to enforce")
    p.add_argument(
        "--index",
        default=None,
        metavar="DIR",
        help="retrieval index (build-index): its top --k chunks go before the prompt as <CTX> ... </CTX>",
    )
    p.add_argument("--k", type=int, default=3, metavar="K", help="chunks to retrieve with --index (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--image", action="append", default=[], metavar="F", help="an image file (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="F", help="a 16-bit PCM WAV file (repeatable)")
    p.add_argument("--video", nargs="+", default=None, metavar="FRAME", help="the frames of one video (image files)")


def _err(msg: str, code: int) -> int:
    print(f"generate: {msg}", file=sys.stderr)
    return code


def _chat_messages(args, user_text: str) -> list[dict]:
    return ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": user_text}
    ]


def _read_media(args, mm) -> list:
    """The --image / --video / --audio files as model inputs (in that order), or ValueError naming the file."""
    from pathlib import Path

    from aion_train.serve.media import MediaError, decode_frames, decode_image, decode_wav

    def read(f: str) -> bytes:
        try:
            return Path(f).read_bytes()
        except OSError as e:
            raise ValueError(f"{f}: cannot read ({e.strerror or e})") from None

    out = []
    try:
        for f in args.image:
            out.append(decode_image(read(f), mm, f"--image {f}"))
        if args.video:
            out.append(decode_frames([read(f) for f in args.video], mm, f"--video {args.video[0]}..."))
        for f in args.audio:
            out.append(decode_wav(read(f), mm, f"--audio {f}"))
    except MediaError as e:
        raise ValueError(str(e)) from None
    return out


def load_policies(path: str | None):
    from aion_train.policy import PolicySet

    return PolicySet.load(path) if path else PolicySet.default_only()


def run(args) -> int:
    if (args.prompt is None) == (args.token_ids is None):
        return _err("give a PROMPT or --token-ids (one of them)", 2)
    if args.jurisdiction and not args.policy:
        return _err("--jurisdiction needs --policy BUNDLE", 2)
    if args.n < 1 or args.n > 16:
        return _err("-n must be in 1..16", 2)
    if args.max_tokens is not None and args.max_tokens < 0:
        return _err("--max-tokens must be >= 0", 2)
    if not 0.0 <= args.temperature <= 2.0 or not 0.0 < args.top_p <= 1.0:
        return _err("--temperature must be in [0, 2] and --top-p in (0, 1]", 2)
    from aion_train.policy import (
        ModerationUnavailable,
        PolicyError,
        UnknownJurisdiction,
    )
    from aion_train.serve.loading import LoadError, load_for_serving
    from aion_train.serve.sampling import SamplingParams
    from aion_train.serve.service import (
        ContextError,
        PromptSpec,
        Service,
        aion_object,
        plan_max_tokens,
    )

    try:
        policies = load_policies(args.policy)
    except PolicyError as e:
        return _err(f"cannot load the policy bundle: {e}", 1)
    try:
        loaded = load_for_serving(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, model_id=args.model_name)
    except (LoadError, OSError, ValueError) as e:
        return _err(str(e), 1)
    retrieval = None
    if args.index:
        if args.token_ids is not None:
            return _err("--index needs a text PROMPT (not --token-ids)", 2)
        from aion_train.serve.retrieval_context import RetrievalContext, RetrievalError

        try:
            retrieval = RetrievalContext(args.index, args.k)
        except RetrievalError as e:
            return _err(str(e), 1 if args.k >= 1 else 2)
    has_media = bool(args.image or args.audio or args.video)
    if has_media and not loaded.multimodal:
        return _err(f"{args.checkpoint} is a text-only checkpoint; --image/--audio/--video need a multimodal one", 2)
    if has_media and args.token_ids is not None:
        return _err("--image/--audio/--video need a text PROMPT (not --token-ids)", 2)
    if loaded.multimodal and args.index:
        return _err("--index is not supported with a multimodal checkpoint", 2)
    media = []
    if has_media:
        try:
            media = _read_media(args, loaded.media_config)
        except (OSError, ValueError) as e:
            return _err(str(e), 2)
    service = Service(loaded, policies, engine="thread")  # no server: the engine runs right here
    try:
        policy = service.policy.resolve(args.jurisdiction)
    except UnknownJurisdiction:
        return _err(
            f"unknown jurisdiction {args.jurisdiction!r}; known jurisdictions: "
            f"{', '.join(service.policy.jurisdictions)}",
            2,
        )
    except ModerationUnavailable as e:
        return _err(e.issues[0].message, 2)
    try:
        if args.token_ids is not None:
            ids = [int(i) for i in json.loads(args.token_ids)]
            if not ids or any(not 0 <= i < loaded.vocab_size for i in ids):
                return _err(f"--token-ids: a non-empty list of ids in [0, {loaded.vocab_size})", 2)
            prompt = PromptSpec(ids=ids, context=ids, text=loaded.tokenizer.decode(ids))
        else:
            text, hits = args.prompt, None
            if retrieval is not None:
                room = loaded.max_seq_len - (args.max_tokens if args.max_tokens is not None else 16)
                if args.chat:

                    def n_tokens(t):
                        return len(loaded.render_chat(_chat_messages(args, t)))
                else:

                    def n_tokens(t):
                        return len(loaded.encode_prompt(t))

                aug = retrieval.augment(args.prompt, n_tokens, room)
                text, hits = aug.text, aug.hits
            if loaded.multimodal:
                from aion_train.serve.mm_prompt import render

                msgs = [{"role": "user", "text": text, "media": media}]
                if args.system:
                    msgs.insert(0, {"role": "system", "text": args.system, "media": []})
                mp = render(loaded.tokenizer, loaded.media_config, msgs)
                ctx_ids = [] if args.chat else mp.ids
                prompt = PromptSpec(
                    ids=mp.ids, context=ctx_ids, text=text, modality=mp.modality, media=mp.media or None
                )
            elif args.chat:
                prompt = PromptSpec(ids=loaded.render_chat(_chat_messages(args, text)), context=[], text="")
            else:
                ids = loaded.encode_prompt(text)
                prompt = PromptSpec(ids=ids, context=ids, text=text)
    except (ValueError, LoadError, TypeError) as e:
        return _err(str(e), 2)
    try:
        max_new = plan_max_tokens(
            len(prompt.ids), args.max_tokens, None if args.chat else 16, loaded.max_seq_len, "--max-tokens", "prompt"
        )
    except ContextError as e:
        return _err(str(e), 2)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=max(0, args.top_k),
        max_tokens=max_new,
        stop=tuple(s for s in args.stop if s),
        seed=args.seed,
    )
    _, results, seed = service.generate([prompt], args.n, params, [max_new], policy)
    import uuid

    aion = aion_object("gen-" + uuid.uuid4().hex, policy, results, seed)
    if retrieval is not None:
        aion["retrieval"] = {**retrieval.describe(), "hits": hits}
    if args.json:
        if args.n == 1:
            r = results[0]
            out = {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason, "aion": aion}
        else:
            out = {
                "choices": [
                    {"index": r.index, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
                    for r in results
                ],
                "aion": aion,
            }
        print(json.dumps(out, ensure_ascii=False))
    else:
        for r in results:
            print(r.text)
    return 0
