"""The multimodal model as post-training drives it: the fused sequence (text tokens with media
tokens at their placeholders) under a causal LM head, a reward head or a value head.

A batch is `input_ids` [B, L] (right-padded: the causal trunk never lets padding change an
earlier position) and a *context*: {"modality": [B, L] (1/2/3 on placeholders), "media": one
list of `serve.media.MediaInput` per row, in placeholder order}. Each model encodes the media
of a batch with its own encoders -> resampler -> gated projection. When that path is frozen
(`lora.encoders=false`: no trainable parameter in it) the output of each item is kept by
content hash and reused: an image is encoded once per model for the whole run, however many
rollouts, scorings and updates read it. With adapters on the encoders it is recomputed each
call (with gradients when training)."""

from __future__ import annotations

import torch
from torch import nn

from aion_train.parallel.device import module_device

from ..critic import Critic
from ..reward import RewardModel

MEDIA_PATH = ("encoders.", "resamplers.", "projections.")


def _mm(model):
    """The MultimodalModel inside an engine, a LoRA-wrapped model or a head wrapper."""
    from aion_train.model.multimodal.model import MultimodalModel

    m = getattr(model, "module", model)
    while not isinstance(m, MultimodalModel):
        m = m.backbone if hasattr(m, "backbone") else m.mm
    return m


def media_path_frozen(mm) -> bool:
    return not any(p.requires_grad for n, p in mm.named_parameters() if n.startswith(MEDIA_PATH))


def _encode(mm, kind: str, items: list) -> torch.Tensor:
    """[N, R, D] tokens of same-kind items, one encoder call."""
    dev = module_device(mm)
    if kind == "audio":
        frames = [it.data.shape[0] for it in items]
        width = max(frames)
        x = torch.zeros(len(items), width, items[0].data.shape[1])
        for i, it in enumerate(items):
            x[i, : frames[i]] = it.data
        batch = {"audio": x.to(dev), "audio_frames": torch.tensor(frames, device=dev)}
    else:
        batch = {kind: torch.stack([it.data for it in items]).to(dev)}
    return mm.encode_media(batch)[kind].tokens


def media_tokens(mm, rows_media: list) -> dict:
    """{kind: EncodedMedia-like tokens [N, R, D]} of a batch's media in row-major placeholder
    order (what `MultimodalModel.run_trunk` scatters), cached per item when the path is frozen."""
    from aion_train.model.multimodal.model import EncodedMedia

    frozen = media_path_frozen(mm)
    cache = mm.__dict__.setdefault("_posttrain_media_cache", {})
    if not frozen:
        cache.clear()
    by_kind: dict = {}
    for row in rows_media:
        for it in row:
            by_kind.setdefault(it.kind, []).append(it)
    out = {}
    for kind, items in by_kind.items():
        todo = [it for it in items if (kind, it.sha256) not in cache] if frozen else items
        if todo:
            uniq = list({it.sha256: it for it in todo}.values())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                tokens = []
                for s in range(0, len(uniq), 64):
                    tokens.append(_encode(mm, kind, uniq[s : s + 64]))
                tokens = torch.cat(tokens)
            if not frozen:
                pos = {it.sha256: i for i, it in enumerate(uniq)}
                out[kind] = EncodedMedia(tokens[[pos[it.sha256] for it in items]], None)
                continue
            for it, t in zip(uniq, tokens):
                cache[(kind, it.sha256)] = t.detach()
        out[kind] = EncodedMedia(torch.stack([cache[(kind, it.sha256)] for it in items]), None)
    return out


def fused_trunk(mm, input_ids: torch.Tensor, context: dict, return_hidden: bool = False, kv_cache=None):
    dev = module_device(mm)
    batch = {"input_ids": input_ids.to(dev), "modality": context["modality"].to(dev)}
    return mm.run_trunk(batch, media_tokens(mm, context["media"]), kv_cache, return_hidden)


class FusedLM(nn.Module):
    """The policy: logits of the trunk over the fused sequence, ModelOutput as the text model's."""

    def __init__(self, mm):
        super().__init__()
        self.mm = mm

    def forward(self, input_ids: torch.Tensor, context: dict):
        return fused_trunk(self.mm, input_ids, context)


class FusedRewardModel(RewardModel):
    """r(x) = w^T h_last + b at the last real token of each row of the fused sequence
    (context["lengths"] [B]: real tokens per row); the head is the text reward model's."""

    def forward(self, input_ids: torch.Tensor, context: dict) -> torch.Tensor:
        hidden = fused_trunk(self.backbone, input_ids, context, return_hidden=True).hidden
        last = context["lengths"].to(hidden.device) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


class FusedCritic(Critic):
    """values[b, t] = w^T h[b, t] + c over the fused sequence (the PPO critic's value head)."""

    def forward(self, input_ids: torch.Tensor, context: dict) -> torch.Tensor:
        hidden = fused_trunk(self.backbone, input_ids, context, return_hidden=True).hidden
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()


def build_mm_model(cfg, groups):
    """The multimodal model of cfg.model (the run's seed), its trunk sharded for `groups`, on
    the phase's device."""
    from aion_train.model.multimodal import build_multimodal_model
    from aion_train.parallel import parallelize_multimodal
    from aion_train.runtime import apply_model_execution

    from ..common import phase_device

    model = parallelize_multimodal(build_multimodal_model(cfg, seed=cfg.seed), groups)
    device = phase_device()
    return apply_model_execution(model.to(device), device, cfg.runtime)


def media_lora_targets(model) -> list[str]:
    """The media path's linears that run as modules: patch / tubelet embeddings, resampler
    MLPs, gated projections. Torch's encoder layers and attention read their weights directly
    (the fused fast path), so an adapter there would be skipped: they get none."""
    inside = (nn.TransformerEncoderLayer, nn.MultiheadAttention)
    skip = {n for n, m in model.named_modules() if isinstance(m, inside)}
    return [
        n
        for n, m in model.named_modules()
        if n.startswith(MEDIA_PATH) and isinstance(m, nn.Linear) and not any(n.startswith(s + ".") for s in skip)
    ]


def apply_mm_lora(model, cfg) -> list[str]:
    """LoRA on the trunk's `lora.targets` (and, with lora.encoders, on `media_lora_targets`);
    everything else frozen."""
    import copy

    from ..lora import apply_lora

    lcfg = copy.deepcopy(cfg.lora)
    if cfg.lora.encoders:
        lcfg.targets = list(lcfg.targets) + media_lora_targets(model)
    return apply_lora(model, lcfg, seed=cfg.seed)
