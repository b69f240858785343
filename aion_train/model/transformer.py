"""Decoder-only MoE transformer (pre-norm, RoPE, GQA, SwiGLU/MoE FFN).

The model knows nothing of parallelism: `aion_train.parallel.parallelize` swaps its
projections, embedding, experts' dispatcher and loss for tensor/expert-parallel ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aion_train.config import ModelConfig
from aion_train.kernels import reference, select

from .attention import Attention
from .attention_backend import PackedSegments, check_backend_installed
from .ffn import DenseFFN
from .moe import MoELayer
from .norms import make_norm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] (or the local vocab shard under TP)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # final normed hidden states [B, T, d]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32; label -100 is ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class FusedCrossEntropy:
    """The same loss through the blockwise cross-entropy kernel (no full fp32 softmax)."""

    def __init__(self, kernels: str):
        self.per_row = select("cross_entropy", kernels)
        self.mean = reference.mean_loss

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.mean(self.per_row(logits, labels), labels)


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    m = cfg.moe
    return m.every > 0 and m.n_experts > 1 and (layer + 1) % m.every == 0


class Block(nn.Module):
    compile_role = "block"  # train.compile=blocks compiles each (model/compile.py)

    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.layer = layer
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, rope, cfg.attention_backend)
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.kernels)
        if is_moe_layer(cfg, layer):
            m = cfg.moe
            self.ffn = MoELayer(
                cfg.d_model,
                m.n_experts,
                m.top_k,
                m.d_ff_expert,
                cfg.activation,
                m.capacity_factor,
                m.balance_coef,
                m.z_loss_coef,
                m.shared_expert_d_ff,
                m.normalize_gates,
                cfg.init_std,
                cfg.kernels,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.kernels)

    def forward(self, x, positions, kv_cache=None, modality=None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), positions, kv_cache, self.layer, attn_mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, aux = self.ffn(h, modality)
        else:
            y, aux = self.ffn(h), h.new_zeros((), dtype=torch.float32)
        return x + y, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_backend_installed(cfg.attention_backend)  # flash without flash-attn: fail now, saying so
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, cfg.kernels)
        self.blocks = nn.ModuleList(Block(cfg, i, rope) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # use_sharded_vocab_loss swaps it for the vocab-parallel one under TP
        self.loss_fn = cross_entropy_loss if cfg.kernels == "torch" else FusedCrossEntropy(cfg.kernels)
        # head + loss in one kernel when the caller needs no logits (None under TP)
        self.head_loss = select("linear_cross_entropy", cfg.kernels)
        self.fused_head_loss = True  # use_fused_head_loss(False): an engine that partitions weights
        self.activation_checkpointing = False
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # scaled init for the projections that write into the residual stream
                scale = (
                    (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("o_proj.weight", "w_down.weight", "w2")) else 1.0
                )
                nn.init.normal_(p, std=std * scale)

    def moe_layers(self):
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache=None,
        inputs_embeds: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        return_hidden: bool = False,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        logits_to_keep: int | None = None,
    ) -> ModelOutput:
        """`return_logits=False` with labels (training): the LM head and the loss run as one
        kernel that never stores the [B, T, V] logits (`logits` is then None).

        Packed rows: `segment_ids` [B, T_keys] (1..k per sample, 0 pad, each a contiguous run;
        with a KV cache it covers the cached keys too) gives attention within each sample only
        (SDPA's block-diagonal causal mask, or flash-attn's varlen kernel), `position_ids` [B, T]
        the RoPE positions (restarting per sample). A packed row then gives every sample the
        logits it gets alone. Without them: plain causal attention, positions 0..T-1 after the
        cached ones. `logits_to_keep=n` (generation): logits for the last n positions only."""
        seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        start = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            positions = torch.arange(start, start + seq_len, device=x.device)
        else:
            positions = position_ids
        mask = None
        if segment_ids is not None:
            if segment_ids.shape[1] != start + seq_len:
                raise ValueError(
                    f"segment_ids has {segment_ids.shape[1]} columns; expected the "
                    f"{start} cached + {seq_len} new positions"
                )
            mask = PackedSegments(segment_ids, seq_len)  # the mask / cu_seqlens, built once on first use
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x, a = checkpoint(block, x, positions, None, modality, mask, use_reentrant=False)
            else:
                x, a = block(x, positions, kv_cache, modality, mask)
            aux = aux + a
        h = self.norm(x)
        out = ModelOutput(logits=None, aux_loss=aux, hidden=h if return_hidden else None)
        if labels is not None and not return_logits and self._plain_head():
            out.lm_loss = reference.mean_loss(self.head_loss(h, self.lm_head.weight, labels), labels)
        else:
            out.logits = self.lm_head(h if logits_to_keep is None else h[:, -logits_to_keep:])
            if labels is not None:
                out.lm_loss = self.loss_fn(out.logits, labels)
        if labels is not None:
            out.loss = out.lm_loss + aux
        return out

    def use_sharded_vocab_loss(self, loss_fn) -> None:
        """The head's output is a vocabulary shard: `loss_fn(logits, labels)` computes the loss
        over the shards (the fused head + loss, which knows no shards, is off)."""
        self.loss_fn, self.head_loss = loss_fn, None

    def use_fused_head_loss(self, enabled: bool) -> None:
        """Whether training may run the head and the loss as one kernel on `lm_head.weight`;
        an engine that gathers partitioned weights only around each module's own forward
        (ZeRO-3) turns it off."""
        self.fused_head_loss = enabled

    def _plain_head(self) -> bool:
        """The fused head + loss may run: allowed, and the head is a plain dense projection
        (not TP-sharded, LoRA-wrapped or quantised)."""
        head = self.lm_head
        return (
            self.fused_head_loss
            and self.head_loss is not None
            and type(head) is nn.Linear
            and type(head.weight) in (torch.Tensor, nn.Parameter)
        )


def build_model(cfg: ModelConfig, seed: int | None = None) -> Transformer:
    """Build the full (unsharded) model; with `seed`, every rank builds identical weights."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Transformer(cfg)
    return Transformer(cfg)
