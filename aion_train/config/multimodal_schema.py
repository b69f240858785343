"""Config of the multimodal model (model.multimodal): encoders, projection, gates,
resampler, cross-attention, modality-aware routing, joint losses.

Media shapes follow the batch contract of the multimodal loader (whose `from_config` reads the
fields named like its MediaSpec: resampler_queries, image_size, patch_size, video_frames,
video_size, tubelet_frames, max_audio_frames, caption_len): images are
`image_size` x `image_size` RGB cut into `patch_size` patches (3*p*p values each), videos are
`video_frames` frames cut into tubelets of `tubelet_frames` x `patch_size` x `patch_size`
(3*t*p*p values each), audio is `n_mels`-bin log-mel. Every media item becomes
`resampler_queries` tokens of the fused sequence (the loader writes that many placeholders).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import require_divisible

MODALITY_IDS = {"text": 0, "image": 1, "audio": 2, "video": 3}


@dataclass
class MultimodalConfig:
    enabled: bool = False  # false = the text-only transformer
    # media geometry (must match the loader's decoders)
    image_size: int = 64
    patch_size: int = 8
    video_frames: int = 8
    video_size: int = 32  # frame side the loader decodes to (the model infers it)
    tubelet_frames: int = 2
    n_mels: int = 80
    max_audio_frames: int = 300  # log-mel frames (3 s at a 10 ms hop; the loader cuts longer clips)
    caption_len: int = 32  # caption / transcript tokens per item for the contrastive loss
    # encoders (ViT / Whisper-style conv + attention / spatio-temporal tubelet transformer)
    encoder_dim: int = 128
    encoder_layers: int = 1
    encoder_heads: int = 4
    # Perceiver resampler: every media item -> resampler_queries tokens
    resampler_queries: int = 8
    resampler_layers: int = 1
    gate_init: float = 0.1  # sigmoid(alpha) at init, per modality
    # optional Flamingo-style gated cross-attention (text queries -> media keys/values)
    cross_attention: bool = False
    cross_attention_every: int = 1  # before every n-th transformer block
    # joint losses
    clip_dim: int = 128  # contrastive embedding width
    clip_temperature: float = 0.07  # initial tau; log(1/tau) is learned
    clip_max_logit_scale: float = 100.0
    uncertainty_weighting: bool = True  # sum_i L_i / (2 sigma_i^2) + log sigma_i; false = plain sum
    lm_weight: float = 1.0  # 0 switches a loss off
    caption_weight: float = 1.0
    clip_weight: float = 1.0
    pad_id: int = 0  # tokenizer pad id (placeholders and caption padding)


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
    _check_modality_experts(cfg, errors)
    mm = cfg.model.multimodal
    if not mm.enabled:
        return
    k = "model.multimodal"
    before = len(errors)
    for name in (
        "image_size",
        "patch_size",
        "video_frames",
        "video_size",
        "tubelet_frames",
        "n_mels",
        "caption_len",
        "max_audio_frames",
        "encoder_dim",
        "encoder_layers",
        "encoder_heads",
        "resampler_queries",
        "resampler_layers",
        "cross_attention_every",
        "clip_dim",
    ):
        if getattr(mm, name) < 1:
            errors.append(f"{k}.{name}={getattr(mm, name)}: must be >= 1")
    if len(errors) > before:
        return
    for key, by in (
        ("image_size", "patch_size"),
        ("video_size", "patch_size"),
        ("video_frames", "tubelet_frames"),
        ("encoder_dim", "encoder_heads"),
    ):
        require_divisible(errors, f"{k}.{key}", getattr(mm, key), f"{k}.{by}", getattr(mm, by))
    if mm.cross_attention:
        require_divisible(
            errors,
            "model.d_model",
            cfg.model.d_model,
            f"{k}.encoder_heads",
            mm.encoder_heads,
            "the cross-attention uses that many heads",
        )
    if not 0.0 < mm.gate_init < 1.0:
        errors.append(f"{k}.gate_init={mm.gate_init}: must be in (0, 1) (it is sigmoid(alpha) at init)")
    if not 0.0 < mm.clip_temperature <= 1.0:
        errors.append(f"{k}.clip_temperature={mm.clip_temperature}: must be in (0, 1]")
    if mm.clip_max_logit_scale < 1.0 / mm.clip_temperature:
        errors.append(f"{k}.clip_max_logit_scale={mm.clip_max_logit_scale} is below 1/{k}.clip_temperature")
    for name in ("lm_weight", "caption_weight", "clip_weight"):
        if getattr(mm, name) < 0:
            errors.append(f"{k}.{name}={getattr(mm, name)}: must be >= 0")
    if not 0 <= mm.pad_id < cfg.model.vocab_size:
        errors.append(f"{k}.pad_id={mm.pad_id} is outside model.vocab_size={cfg.model.vocab_size}")
    if mm.resampler_queries + 2 > cfg.data.seq_len:
        errors.append(
            f"{k}.resampler_queries={mm.resampler_queries} (+2 delimiters) does not fit in "
            f"data.seq_len={cfg.data.seq_len}"
        )
    if cfg.parallel.sequence_parallel:
        errors.append(
            "parallel.sequence_parallel=true with model.multimodal.enabled: the fused sequence is "
            "built from embeddings before the trunk, which sequence parallelism does not split; "
            "set parallel.sequence_parallel=false"
        )


def modality_id(key) -> int | None:
    """'image' / 1 / '1' -> 1; None for anything that is not a media modality."""
    if isinstance(key, str) and key in MODALITY_IDS:
        value = MODALITY_IDS[key]
    else:
        try:
            value = int(key)
        except (TypeError, ValueError):
            return None
    return value if value in (1, 2, 3) else None


def _check_modality_experts(cfg, errors: list[str]) -> None:
    """model.moe.modality_experts: {image|audio|video: [expert ids]}; each modality's tokens are
    routed only to its reserved experts, so a list needs at least top_k valid, distinct ids."""
    moe = cfg.model.moe
    for key, experts in (moe.modality_experts or {}).items():
        path = f"model.moe.modality_experts.{key}"
        if modality_id(key) is None:
            errors.append(f"{path}: unknown modality (use image, audio or video)")
            continue
        if not isinstance(experts, (list, tuple)) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in experts
        ):
            errors.append(f"{path}={experts!r}: must be a list of expert ids")
            continue
        bad = [e for e in experts if not 0 <= e < moe.n_experts]
        if bad:
            errors.append(f"{path}: expert ids {bad} outside 0..model.moe.n_experts-1={moe.n_experts - 1}")
        if len(set(experts)) < moe.top_k:
            errors.append(f"{path}: {len(set(experts))} distinct experts, fewer than model.moe.top_k={moe.top_k}")
