"""The multimodal fusion model: per-modality encoders -> Perceiver resampler -> gated projection
into d_model -> media tokens scattered into the embedded text at their placeholders -> the
existing MoE `Transformer` trunk (`self.lm`, modality-aware routing, packed-row masks), with
optional gated cross-attention, and the joint losses: causal LM on plain text, caption/answer
loss on media-conditioned tokens, symmetric CLIP InfoNCE (media vs the trunk's pooled caption
text), combined by uncertainty weighting, plus the MoE balance loss.

Parallelism: `aion_train.parallel.parallelize_multimodal` shards the trunk exactly as the text model (TP/EP, ZeRO
through the engine); encoders, resamplers, projections, contrastive heads and cross-attention
stay replicated (every rank runs them on its own batch; their gradients are complete on every
TP rank because the trunk's input and loss are replicated there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.config import ModelConfig
from aion_train.config.multimodal_schema import modality_id

from ..moe.router import modality_expert_mask
from ..transformer import Transformer
from .cross_attention import GatedCrossAttention, build_context
from .encoders import AudioEncoder, ImageEncoder, VideoEncoder, masked_mean
from .fusion import KINDS, GatedProjection, item_locations, scatter_media
from .losses import LogitScale, UncertaintyWeighting, clip_loss, masked_token_loss, same_caption_targets
from .resampler import PerceiverResampler


@dataclass
class MultimodalOutput:
    loss: torch.Tensor  # uncertainty-weighted joint loss + MoE aux
    losses: dict[str, torch.Tensor]  # "lm", "caption", "clip" (those present in the batch), "aux"
    logits: torch.Tensor  # [B, T, V] (the local vocab shard under TP)
    extras: dict[str, float] = field(default_factory=dict)  # sigmas, weights, gates, temperature
    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None  # mean CE over every labelled token (no grad), for perplexity


@dataclass
class EncodedMedia:
    tokens: torch.Tensor  # [N, R, d_model] resampled, projected, gated: what enters the sequence
    pooled: torch.Tensor  # [N, encoder_dim] mean encoder output (the contrastive media side)


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mm = cfg.multimodal
        self.cfg, self.mm = cfg, mm
        self.lm = Transformer(cfg)
        de, p, heads, layers = mm.encoder_dim, mm.patch_size, mm.encoder_heads, mm.encoder_layers
        self.encoders = nn.ModuleDict(
            {
                "image": ImageEncoder(3 * p * p, (mm.image_size // p) ** 2, de, layers, heads),
                "audio": AudioEncoder(mm.n_mels, de, layers, heads, mm.max_audio_frames),
                "video": VideoEncoder(
                    3 * mm.tubelet_frames * p * p, mm.video_frames // mm.tubelet_frames, de, layers, heads
                ),
            }
        )
        self.resamplers = nn.ModuleDict(
            {k: PerceiverResampler(de, mm.resampler_queries, mm.resampler_layers, heads) for k in KINDS}
        )
        self.projections = nn.ModuleDict({k: GatedProjection(de, cfg.d_model, mm.gate_init) for k in KINDS})
        self.clip_media = nn.ModuleDict({k: nn.Linear(de, mm.clip_dim, bias=False) for k in KINDS})
        self.clip_text = nn.Linear(cfg.d_model, mm.clip_dim, bias=False)
        self.logit_scale = LogitScale(mm.clip_temperature, mm.clip_max_logit_scale)
        self.loss_weighting = UncertaintyWeighting(
            {"lm": mm.lm_weight, "caption": mm.caption_weight, "clip": mm.clip_weight}, mm.uncertainty_weighting
        )
        self.cross_attn = nn.ModuleList()
        if mm.cross_attention:
            for i, block in enumerate(self.lm.blocks):
                if i % mm.cross_attention_every == 0:
                    layer = GatedCrossAttention(cfg.d_model, heads)
                    self.cross_attn.append(layer)
                    block.register_forward_pre_hook(layer.pre_hook)
        reserved = {modality_id(k): v for k, v in (cfg.moe.modality_experts or {}).items()}
        if reserved:
            mask = modality_expert_mask(reserved, cfg.moe.n_experts)
            for moe in self.lm.moe_layers():
                moe.router.modality_mask = mask

    # -- media ------------------------------------------------------------------------------
    def encode_media(self, batch: dict) -> dict[str, EncodedMedia]:
        """Run each kind's encoder, resampler and gated projection once over its items."""
        out = {}
        for kind in KINDS:
            x = batch.get(kind)
            if x is None or x.shape[0] == 0:
                continue
            if kind == "audio":
                tokens, pad = self.encoders["audio"](x, batch.get("audio_frames"))
            else:
                tokens, pad = self.encoders[kind](x)
            resampled = self.resamplers[kind](tokens, pad)
            out[kind] = EncodedMedia(self.projections[kind](resampled), masked_mean(tokens, pad))
        return out

    def fuse(self, input_ids: torch.Tensor, modality: torch.Tensor, media: dict[str, EncodedMedia]) -> torch.Tensor:
        """Embedded sequence [B, T, D] with the media tokens at their placeholder positions."""
        return scatter_media(self.lm.embed_tokens(input_ids), modality, {k: m.tokens for k, m in media.items()})

    def set_media_context(
        self, media: dict[str, EncodedMedia] | None, modality=None, segment_ids=None, q_seg=None, q_pos=None
    ) -> None:
        """Give the cross-attention layers (if any) the media of this trunk call; None = none."""
        if not len(self.cross_attn):
            return
        ctx = None
        if media is not None:
            b = modality.shape[0]
            items = [(m.tokens, *item_locations(modality, k, m.tokens.shape[1], segment_ids)) for k, m in media.items()]
            ctx = build_context(items, b, self.cfg.d_model, q_seg, q_pos, modality.device)
        for layer in self.cross_attn:
            layer.context = ctx

    def run_trunk(self, batch: dict, media: dict[str, EncodedMedia], kv_cache=None, return_hidden: bool = False):
        """Trunk forward over the fused prompt/batch; returns the trunk's ModelOutput (with the
        final normed hidden states when `return_hidden`: reward and value heads read them)."""
        ids = batch["input_ids"]
        modality = batch.get("modality")
        modality = torch.zeros_like(ids) if modality is None else modality
        seg, pos = batch.get("segment_ids"), batch.get("position_ids")
        q_seg = torch.ones_like(ids) if seg is None else seg
        self.set_media_context(media, modality, seg, q_seg, torch.arange(ids.shape[1], device=ids.device))
        return self.lm(
            inputs_embeds=self.fuse(ids, modality, media),
            modality=modality,
            kv_cache=kv_cache,
            segment_ids=seg,
            position_ids=pos,
            return_hidden=return_hidden,
        )

    # -- contrastive embeddings -------------------------------------------------------------
    def _experts_exchange_tokens(self) -> bool:
        """Some MoE layer of the trunk exchanges tokens with other ranks (expert parallelism)."""
        return any(getattr(getattr(m, "dispatcher", None), "exchanges_tokens", False) for m in self.lm.modules())

    def text_features(self, ids: torch.Tensor):
        """Trunk on caption tokens alone (pad = mask), mean-pooled over real tokens and projected:
        ([N, clip_dim] unnormalised, MoE aux of that pass)."""
        self.set_media_context(None)
        real = ids != self.mm.pad_id
        # never checkpointed: a recompute in backward would see the cross-attention context of
        # the main pass (set later); captions are short, their activations cheap to keep
        saved, self.lm.activation_checkpointing = self.lm.activation_checkpointing, False
        try:
            out = self.lm(ids, segment_ids=real.long(), return_hidden=True)
        finally:
            self.lm.activation_checkpointing = saved
        pooled = masked_mean(out.hidden, ~real)
        return self.clip_text(pooled), out.aux_loss

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Normalised contrastive embeddings [N, clip_dim] of caption token rows (for retrieval)."""
        return F.normalize(self.text_features(ids)[0].float(), dim=-1)

    def encode_image(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalised contrastive embeddings [N, clip_dim] of images given as patches [N, P, 3*p*p]."""
        tokens, pad = self.encoders["image"](patches)
        return F.normalize(self.clip_media["image"](masked_mean(tokens, pad)).float(), dim=-1)

    def contrastive_loss(self, batch: dict, media: dict[str, EncodedMedia]):
        """(mean over kinds with >= 2 captioned items of the CLIP loss or None, extras, aux)."""
        pad = self.mm.pad_id
        picked = []
        for kind, enc in media.items():
            caps = batch.get(f"{kind}_caption_ids")
            if caps is None or caps.shape[0] == 0:
                continue
            if caps.shape[0] != enc.pooled.shape[0]:
                raise ValueError(f"{kind}_caption_ids has {caps.shape[0]} rows for {enc.pooled.shape[0]} {kind} items")
            has = (caps != pad).any(1)
            if int(has.sum()) >= 2:
                picked.append((kind, enc.pooled[has], caps[has]))
        if not picked:
            if self._experts_exchange_tokens():  # expert all-to-all needs the same calls on every rank
                feats, aux = self.text_features(
                    torch.full((1, 1), pad + 1, dtype=torch.long, device=self.clip_text.weight.device)
                )
                return None, {}, aux + 0.0 * feats.sum()
            return None, {}, None
        width = max(c.shape[1] for _, _, c in picked)
        caps = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad) for _, _, c in picked])
        width = int((caps != pad).any(0).nonzero().max()) + 1  # drop all-pad columns
        caps = caps[:, :width]
        text, aux = self.text_features(caps)
        text = F.normalize(text.float(), dim=-1)
        scale, extras, losses, start = self.logit_scale(), {}, [], 0
        for kind, pooled, c in picked:
            n = c.shape[0]
            m = F.normalize(self.clip_media[kind](pooled).float(), dim=-1)
            targets = same_caption_targets(caps[start : start + n])
            loss = clip_loss(m, text[start : start + n], scale, targets)
            extras[f"clip_{kind}"] = float(loss.detach())
            losses.append(loss)
            start += n
        return torch.stack(losses).mean(), extras, aux

    # -- training forward -------------------------------------------------------------------
    def forward(self, batch: dict) -> MultimodalOutput:
        """One batch of the loader's contract -> joint loss, per-loss scalars and logits."""
        labels = batch["labels"]
        kinds = batch.get("loss_kind")
        kinds = (labels != -100).long() if kinds is None else kinds
        media = self.encode_media(batch)
        # the caption pass first: the cross-attention context left set is then the main pass's,
        # which activation checkpointing reads again when it recomputes the blocks in backward
        clip, extras, text_aux = self.contrastive_loss(batch, media)
        out = self.run_trunk(batch, media)
        losses = {
            "lm": masked_token_loss(self.lm.loss_fn, out.logits, labels, kinds, 1),
            "caption": masked_token_loss(self.lm.loss_fn, out.logits, labels, kinds, 2),
            "clip": clip,
        }
        total, weights = self.loss_weighting(losses)
        aux = out.aux_loss if text_aux is None else out.aux_loss + text_aux
        with torch.no_grad():
            lm_loss = self.lm.loss_fn(out.logits, labels) if bool((labels != -100).any()) else None
        extras.update(weights)
        extras.update({f"gate_{k}": float(self.projections[k].gate.detach()) for k in KINDS})
        extras["clip_temperature"] = float(1.0 / self.logit_scale().detach().exp())
        present = {k: v for k, v in losses.items() if v is not None}
        present["aux"] = aux
        return MultimodalOutput(
            loss=total + aux, losses=present, logits=out.logits, extras=extras, aux_loss=aux, lm_loss=lm_loss
        )

    # -- helpers the trainer and evals use ----------------------------------------------------
    def moe_layers(self):
        return self.lm.moe_layers()

    @property
    def activation_checkpointing(self) -> bool:
        return self.lm.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.lm.activation_checkpointing = value

    def answer_logprobs(self, batch_prompt: dict, candidates: list[list[int]], gather_logits=None) -> torch.Tensor:
        """[B, C] summed log-probabilities of each candidate answer after each prompt (see generate.py)."""
        from .generate import score_candidates

        return score_candidates(self, batch_prompt, candidates, gather_logits)

    def generate(self, batch_prompt: dict, max_new_tokens: int, **kw) -> torch.Tensor:
        """KV-cached generation after a media prompt (see generate.py)."""
        from .generate import generate_multimodal

        return generate_multimodal(self, batch_prompt, max_new_tokens, **kw)


def build_multimodal_model(cfg, seed: int | None = None) -> MultimodalModel:
    """Full (unsharded) model from a Config or ModelConfig; with `seed` identical on every rank."""
    model_cfg = cfg.model if hasattr(cfg, "model") else cfg
    if not model_cfg.multimodal.enabled:
        raise ValueError("model.multimodal.enabled is false: build the text model with build_model")
    if seed is None:
        return MultimodalModel(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalModel(model_cfg)
