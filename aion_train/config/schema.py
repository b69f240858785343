"""The one typed config tree. Every knob of the platform lives here.

Sections are plain dataclasses so that the tree is easy to read, print and diff;
`load.py` turns YAML + dotted overrides into it and `validate.py` checks the
cross-field rules before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .multimodal_schema import MultimodalConfig
from .pipeline_schema import PipelineConfig
from .posttrain_schema import LoRAConfig, RewardConfig, SFTConfig
from .ppo_schema import PPOConfig


@dataclass
class MoEConfig:
    n_experts: int = 8  # 0 or 1 with moe.every=0 gives a dense model
    top_k: int = 2  # 1 = Switch routing
    d_ff_expert: int = 256
    every: int = 1  # MoE FFN in every `every`-th layer (0 = no MoE layers)
    capacity_factor: Optional[float] = None  # None = dropless
    balance_coef: float = 0.01  # alpha in alpha * N * sum_i f_i * P_i
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE), 0 = off
    shared_expert_d_ff: int = 0  # 0 = no shared expert
    normalize_gates: bool = True  # renormalise gates over the top-k
    modality_experts: dict = field(default_factory=dict)  # modality -> list of reserved experts


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (MHA); fewer = grouped-query attention
    d_ff: int = 512  # dense FFN width (layers that are not MoE)
    activation: str = "swiglu"  # swiglu | gelu | relu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False
    attention_backend: str = "auto"  # auto | sdpa | flash
    kernels: str = "auto"  # auto | torch | triton: fused kernels (aion_train/kernels)
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    ep: int = 1  # expert-parallel size (divides the data-parallel size)
    dp: Optional[int] = None  # data-parallel size; None = world_size / tp
    world_size: Optional[int] = None  # None = taken from the launcher (WORLD_SIZE) or --nproc
    sequence_parallel: bool = False
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 120.0  # collective timeout: a dead rank fails the job fast


@dataclass
class DataConfig:
    dir: str = "data/demo"  # shards + tokenizer live here (built if absent)
    train_shards: str = ""  # glob; empty = the demo shards in `dir`
    val_shards: str = ""
    tokenizer: str = ""  # SentencePiece model; empty = `dir`/tokenizer.model
    # the seed the embedded demo sets (and their tokenizer) are built with: not the run's seed,
    # so runs of several seeds share one demo folder instead of rebuilding it under each other
    demo_seed: int = 1234
    seq_len: int = 128
    micro_batch_size: int = 8
    num_workers: int = 0
    shuffle_buffer: int = 256
    document_mask: bool = True  # packed text rows: attend within each document only
    # (segment_ids + per-document positions); false = one
    # causal sequence per row, documents see each other


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # eta_min = 0.1 * eta_max
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 on GPU only)
    zero_stage: int = 1
    activation_checkpointing: bool = False
    compile: str = "eager"  # eager | blocks: each transformer block through torch.compile (model/compile.py)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    max_bad_steps: int = 3  # non-finite losses in a row before stopping
    log_every: int = 1
    # starting weights of a fresh run: a Hugging Face model folder (config.json + safetensors; its
    # architecture fills model.*, its tokenizer.json data.tokenizer) or a checkpoint of ours; fresh
    # optimizer at step 0. "" = random init (or the run folder's import-hf checkpoint)
    init_from: str = ""
    stop_at_step: Optional[int] = None  # end this run early (with a checkpoint), e.g. to fit a Slurm
    # time slot; the schedule still follows `steps`


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty = MLFLOW_TRACKING_URI or sqlite in the run folder
    experiment: str = "aion-train"
    run_name: str = ""


@dataclass
class RuntimeConfig:
    """How this process runs, not what it computes (the results are the same either way);
    resolved and logged once at start (aion_train.runtime)."""

    progress_bar: str = "auto"  # auto (when stderr is a terminal) | always | never
    cpu_allocator: str = "keep"  # keep: freed CPU blocks stay in the heap (glibc mallopt) | system
    deepspeed_shm_op: bool = False  # build DeepSpeed's shared-memory all-reduce op on CPU (a gcc build per start)
    grouped_mm: str = "auto"  # MoE expert matmul: auto (torch grouped GEMM when its probe passes,
    # else one matmul per expert) | grouped (or an error) | per_expert


@dataclass
class Config:
    seed: int = 1234
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
