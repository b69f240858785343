"""aion-train train-tokenizer --from PATH... --out F --vocab-size N [--model-type bpe|unigram]

SentencePiece on your corpus (:func:`aion_train.data.tokenizer.train_tokenizer`): byte fallback,
identity normalisation, ids 0-3 <pad> <unk> <s> </s>, then the platform's delimiter tokens
(<I> </I> <A> </A> <V> </V> <T> </T> <CTX> </CTX>, one id each, also inside text), then the
chat role tokens (<|system|> <|user|> <|assistant|> <|end|>) as control symbols: reserved ids
that no text encodes to. PATH: a shard folder of ours (its train split), .tar shards, or text /
JSONL / Parquet / CSV / HF datasets files and folders (as `make-shards --from`)."""

from __future__ import annotations

import os
import sys

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument("--from", dest="sources", nargs="+", required=True, metavar="PATH", help="corpus or shard folder")
    p.add_argument("--out", required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (exact)")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--text-field", default="text", help="field holding the text (JSONL/CSV/Parquet/HF)")
    p.add_argument("--format", default="auto", help="auto|text|jsonl|parquet|csv|hf (as make-shards)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    add_overwrite_argument(p)


def run(args) -> int:
    import json

    from aion_train.data.corpus_texts import iter_texts
    from aion_train.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
    from aion_train.posttrain.chat_template import ROLE_TOKENS

    if os.path.isdir(args.out):
        print(f"train-tokenizer: --out {args.out} is a folder; give the .model file to write", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not args.overwrite:
        print(f"train-tokenizer: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    counted = {"texts": 0, "chars": 0}

    def texts():
        for t in iter_texts(args.sources, "train", args.format, args.text_field):
            counted["texts"] += 1
            counted["chars"] += len(t)
            yield t

    try:
        train_tokenizer(
            texts(), args.out, args.vocab_size, seed=args.seed, model_type=args.model_type, control_symbols=ROLE_TOKENS
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"train-tokenizer: {e}", file=sys.stderr)
        return 1
    tok = Tokenizer(args.out)
    summary = {
        "out": args.out,
        "vocab_size": tok.vocab_size,
        "model_type": args.model_type,
        **counted,
        "reserved": ["<pad>", "<unk>", "<s>", "</s>", *SPECIAL_TOKENS, *ROLE_TOKENS],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {args.model_type}, vocab {tok.vocab_size}, {counted['texts']} texts")
    return 0
