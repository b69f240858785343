"""aion-train export-hf --checkpoint C --out DIR [--family F] [--dtype D] [--expert-layout per-expert|fused]

--family: mixtral | llama | mistral | qwen2 | qwen2_moe; default: the family the run was imported
from (RUN/hf_source), else the one the model implies (dense: llama; MoE: mixtral). Tokenizer files and generation_config.json are written too
(aion_train.interop.hf). The Mixtral case:

C is a step folder, a checkpoints folder or a run folder (its latest checkpoint), written with
any TP/EP layout. DIR gets config.json + safetensors that `MixtralForCausalLM.from_pretrained(DIR)`
loads. Only models Mixtral can express are exported (every layer MoE, SwiGLU, RMSNorm, no
shared expert, top_k >= 2 with renormalised gates); others are refused with the keys named.
A model trained with a capacity factor exports too, but Mixtral is dropless: its outputs
differ wherever our model dropped token copies."""

from __future__ import annotations

import sys

from .output_dirs import add_overwrite_argument, print_summary


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or run folder")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--dtype",
        default="keep",
        choices=["keep", "float32", "bfloat16", "float16"],
        help="tensor dtype in the export (default: as saved)",
    )
    p.add_argument(
        "--expert-layout",
        default="per-expert",
        choices=["per-expert", "fused"],
        help="per-expert: experts.J.w1/w2/w3 (every published Mixtral; default); "
        "fused: transformers 5's mlp.experts.gate_up_proj/down_proj",
    )
    p.add_argument("--family", default=None, help="mixtral|llama|mistral|qwen2|qwen2_moe (default: see above)")
    p.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    add_overwrite_argument(p)


def run(args) -> int:
    from aion_train.checkpoint import CheckpointError
    from aion_train.config import ConfigError
    from aion_train.interop.hf import export_any
    from aion_train.interop.hf_mixtral import DTYPES, NotExpressibleError
    from aion_train.ownership import ForeignFolderError

    try:
        summary = export_any(
            args.checkpoint,
            args.out,
            family=args.family,
            dtype=None if args.dtype == "keep" else DTYPES[args.dtype],
            expert_layout=args.expert_layout,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except (NotExpressibleError, CheckpointError, ConfigError, ForeignFolderError) as e:
        print(f"export-hf: {e}", file=sys.stderr)
        return 2
    return print_summary(
        summary,
        args.json,
        f"wrote {summary['out']}: {', '.join(summary['files'])} "
        f"({summary['parameters']:,} parameters, {summary['dtype']})",
    )
