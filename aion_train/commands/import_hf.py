"""aion-train import-hf --hf DIR --out RUN_DIR [--tp T --ep E] [--config F [overrides]]

Writes a Hugging Face Mixtral, Llama, Mistral, Qwen2 or Qwen2-MoE folder (config.json +
safetensors, read locally; aion_train.interop.hf) as
RUN_DIR/checkpoints/step_00000000 in our layout: a manifest with model_config and layout
{tp, ep, world, zero_stage} and the model payloads of the ranks that save the model for
that TP/EP layout. There is no optimizer or trainer state (manifest field
`optimizer_state: false`): training from it must start with a fresh optimizer at step 0.

With --config, the model keys that do not change the forward pass (init_std, balance/z-loss
coefficients, attention backend) and --tp/--ep/world/zero_stage defaults come from that
training config, so the manifest matches the config it will be trained with.

The source's config.json, tokenizer files and generation config are kept in RUN_DIR/hf_source;
the summary names the tokenizer to train with (data.tokenizer=RUN_DIR/hf_source/tokenizer.json)."""

from __future__ import annotations

import sys

from .check_config import add_config_arguments
from .output_dirs import add_overwrite_argument, print_summary


def add_arguments(p):
    p.add_argument("--hf", required=True, help="folder with config.json and model*.safetensors")
    p.add_argument(
        "--out",
        required=True,
        help="run folder to create (absent, empty, or a run of ours whose checkpoints/ is empty)",
    )
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size of the written shards (default 1)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size of the written shards (default 1)")
    p.add_argument("--world", type=int, default=None, help="world size recorded in the layout (default tp*ep)")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="model.max_seq_len (default: max_position_embeddings, or the sliding window)",
    )
    p.add_argument("--json", action="store_true")
    add_overwrite_argument(p)
    add_config_arguments(p)


def run(args) -> int:
    from aion_train.checkpoint import CheckpointError
    from aion_train.config import ConfigError, load_config
    from aion_train.interop.hf import import_any as import_hf
    from aion_train.interop.hf_mixtral import DTYPES, NotExpressibleError

    base, tp, ep, world, zero = None, args.tp or 1, args.ep or 1, args.world, 1
    if args.config or args.overrides:
        try:
            cfg = load_config(args.config, args.overrides, validate=False)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return 2
        base, zero = cfg.model, cfg.train.zero_stage
        tp, ep = args.tp or cfg.parallel.tp, args.ep or cfg.parallel.ep
        world = world or cfg.parallel.world_size
    try:
        summary = import_hf(
            args.hf,
            args.out,
            tp,
            ep,
            base=base,
            world=world,
            zero_stage=zero,
            dtype=None if args.dtype == "keep" else DTYPES[args.dtype],
            max_seq_len=args.max_seq_len,
            overwrite=args.overwrite,
        )
    except (NotExpressibleError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"import-hf: {e}", file=sys.stderr)
        return 2
    return print_summary(
        summary,
        args.json,
        f"wrote {summary['checkpoint']} (tp={tp}, ep={ep}, "
        f"{summary['parameters']:,} parameters, {summary['dtype']}, {summary['family']}); no optimizer "
        f"state: training from it starts a fresh optimizer; tokenizer: {summary['tokenizer']}",
    )
