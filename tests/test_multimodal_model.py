"""The multimodal fusion model checked against direct references: gates, resampler, fused-sequence
placement, packed-row masks vs separate runs, CLIP and uncertainty-weighting formulas,
modality-aware routing, KV-cached generation and answer scoring vs full recompute, TP/EP ranks
vs the single process, and a short training run."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from aion_train.config import ConfigError, load_config
from aion_train.model.multimodal import build_multimodal_model
from aion_train.model.multimodal.cross_attention import GatedCrossAttention
from aion_train.model.multimodal.encoders import AudioEncoder
from aion_train.model.multimodal.fusion import modality_from_ids, scatter_media
from aion_train.model.multimodal.losses import UncertaintyWeighting, clip_loss
from aion_train.model.multimodal.resampler import PerceiverResampler
from aion_train.parallel import ParallelPlan, build_groups, parallelize_multimodal, run_ranks

DELIMS = {"image": (4, 5), "audio": (6, 7), "video": (8, 9)}  # <I> </I> <A> </A> <V> </V>; pad = 0
KIND_ID = {"image": 1, "audio": 2, "video": 3}
T_OPEN, T_CLOSE = 10, 11
SMALL = [
    "model.multimodal.enabled=true",
    "model.vocab_size=64",
    "model.d_model=32",
    "model.d_ff=64",
    "model.moe.d_ff_expert=32",
    "model.kernels=torch",
    "model.multimodal.encoder_dim=32",
    "model.multimodal.encoder_heads=2",
    "model.multimodal.resampler_queries=4",
    "model.multimodal.clip_dim=16",
    "model.multimodal.image_size=16",
    "model.multimodal.patch_size=4",
    "model.multimodal.n_mels=8",
    "model.multimodal.video_frames=4",
    "data.seq_len=64",
    "model.max_seq_len=128",
]


def small_cfg(*extra, world_size=None):
    return load_config("configs/tiny_cpu.yaml", SMALL + list(extra), world_size=world_size)


def make_batch(cfg, seed=0, rows=3, length=48, per_row=2):
    """A batch of the loader's contract: rows of packed samples (media item + captioned text, or
    plain text), cycling image / audio / video / text-only samples."""
    g = torch.Generator().manual_seed(seed)
    mm = cfg.model.multimodal
    r = mm.resampler_queries
    z = lambda: torch.zeros(rows, length, dtype=torch.long)  # noqa: E731
    ids, kind, modality, seg, pos = z(), z(), z(), z(), z()
    labels = torch.full((rows, length), -100)
    caps = {k: [] for k in KIND_ID}
    cycle = ["image", "audio", "video", None]
    j = 0
    for b in range(rows):
        t = 0
        for s in range(per_row):
            media = cycle[j % 4]
            j += 1
            text = torch.randint(
                12, cfg.model.vocab_size, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g
            ).tolist()
            row, mods = [], []
            if media:
                row += [DELIMS[media][0]] + [0] * r + [DELIMS[media][1]]
                mods += [0] + [KIND_ID[media]] * r + [0]
                caps[media].append(text)
            row += [T_OPEN] + text + [T_CLOSE]
            mods += [0] * (len(text) + 2)
            n = len(row)
            ids[b, t : t + n], modality[b, t : t + n] = torch.tensor(row), torch.tensor(mods)
            seg[b, t : t + n], pos[b, t : t + n] = s + 1, torch.arange(n)
            for i in range(t + n - len(text) - 2, t + n - 1):  # predict the text and </T>
                labels[b, i], kind[b, i] = ids[b, i + 1], 2 if media else 1
            t += n
    p = mm.patch_size
    n_patch = (mm.image_size // p) ** 2
    counts = {k: len(v) for k, v in caps.items()}
    frames = torch.randint(5, 13, (counts["audio"],), generator=g)
    audio = torch.randn(counts["audio"], 12, mm.n_mels, generator=g)
    for i, f in enumerate(frames):
        audio[i, f:] = 0

    def pad_caps(lst):
        w = max([len(c) for c in lst], default=1)
        return torch.tensor([c + [0] * (w - len(c)) for c in lst], dtype=torch.long).view(len(lst), w)

    return dict(
        input_ids=ids,
        labels=labels,
        loss_kind=kind,
        modality=modality,
        segment_ids=seg,
        position_ids=pos,
        image=torch.randn(counts["image"], n_patch, 3 * p * p, generator=g),
        video=torch.randn(
            counts["video"],
            (mm.video_frames // mm.tubelet_frames) * n_patch,
            3 * mm.tubelet_frames * p * p,
            generator=g,
        ),
        audio=audio,
        audio_frames=frames,
        **{f"{k}_caption_ids": pad_caps(v) for k, v in caps.items()},
    )


@pytest.fixture(scope="module")
def cfg():
    return small_cfg()


@pytest.fixture(scope="module")
def model(cfg):
    return build_multimodal_model(cfg, seed=0).eval()


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_gates_start_at_sigmoid_alpha_0_1(model, cfg):
    batch = make_batch(cfg)
    for kind in ("image", "audio", "video"):
        proj = model.projections[kind]
        assert torch.sigmoid(proj.alpha).item() == pytest.approx(0.1, abs=1e-7)
    enc, _ = model.encoders["image"](batch["image"])
    resampled = model.resamplers["image"](enc)
    want = 0.1 * F.linear(resampled, model.projections["image"].proj.weight, model.projections["image"].proj.bias)
    got = model.encode_media(batch)["image"].tokens
    assert (got - want).abs().max() < 1e-6


@torch.no_grad()
def test_resampler_196_to_8_and_ignores_padding():
    torch.manual_seed(0)
    res = PerceiverResampler(32, n_queries=8, layers=2, heads=4).eval()
    media = torch.randn(3, 196, 32)
    assert res(media).shape == (3, 8, 32)
    # item 0 with 150 real tokens + 46 padded ones == the same item given 150 tokens alone
    pad = torch.zeros(3, 196, dtype=torch.bool)
    pad[0, 150:] = True
    padded = res(media.masked_fill(pad[..., None], 7.0), pad)[0]
    alone = res(media[:1, :150])[0]
    assert (padded - alone).abs().max() < 1e-5


@torch.no_grad()
def test_audio_encoder_output_does_not_depend_on_padding():
    torch.manual_seed(0)
    enc = AudioEncoder(8, 16, 1, 2, max_frames=64).eval()
    mel = torch.randn(1, 9, 8)
    alone, _ = enc(mel)
    padded, pad = enc(torch.cat([mel, torch.randn(1, 7, 8)], 1), torch.tensor([9]))
    assert alone.shape[1] == 5 and pad[0].tolist() == [False] * 5 + [True] * 3
    assert (padded[0, :5] - alone[0]).abs().max() < 1e-5


@torch.no_grad()
def test_media_land_exactly_at_placeholders(model, cfg):
    batch = make_batch(cfg)
    assert torch.equal(modality_from_ids(batch["input_ids"], DELIMS, 0), batch["modality"])
    media = model.encode_media(batch)
    fused = model.fuse(batch["input_ids"], batch["modality"], media)
    text = model.lm.embed_tokens(batch["input_ids"])
    mod = batch["modality"]
    assert torch.equal(fused[mod == 0], text[mod == 0])
    r = cfg.model.multimodal.resampler_queries
    for kind, kid in KIND_ID.items():
        seen = 0
        for b in range(mod.shape[0]):  # row-major walk over the runs
            t = 0
            while t < mod.shape[1]:
                if mod[b, t] == kid:
                    assert torch.equal(fused[b, t : t + r], media[kind].tokens[seen])
                    seen, t = seen + 1, t + r
                else:
                    t += 1
        assert seen == batch[kind].shape[0] > 0
    bad = dict(batch, image=batch["image"][:1])
    with pytest.raises(ValueError, match="image: the batch has 1 items"):
        scatter_media(text, mod, {"image": model.encode_media(bad)["image"].tokens})


@torch.no_grad()
def test_packed_rows_equal_separate_runs(model, cfg):
    """Block-diagonal causal mask + restarting positions: a packed row's logits equal each sample
    run on its own (the trunk with MoE layers, and the whole fusion model)."""
    batch = make_batch(cfg, rows=2, per_row=3)
    out = model.run_trunk(batch, model.encode_media(batch)).logits
    item = {k: 0 for k in KIND_ID}
    for b in range(2):
        for s in (1, 2, 3):
            cols = (batch["segment_ids"][b] == s).nonzero().squeeze(1)
            ids = batch["input_ids"][b : b + 1, cols]
            one = {"input_ids": ids, "modality": batch["modality"][b : b + 1, cols]}
            for kind, kid in KIND_ID.items():
                if bool((one["modality"] == kid).any()):
                    one[kind] = batch[kind][item[kind] : item[kind] + 1]
                    if kind == "audio":
                        one["audio_frames"] = batch["audio_frames"][item[kind] : item[kind] + 1]
                    item[kind] += 1
            alone = model.run_trunk(one, model.encode_media(one)).logits
            assert (out[b, cols] - alone[0]).abs().max() < 1e-5
    # trunk alone: segment_ids all 1 + default positions == the plain causal path
    ids = batch["input_ids"]
    plain = model.lm(ids).logits
    masked = model.lm(ids, segment_ids=torch.ones_like(ids), position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    assert (plain - masked.logits).abs().max() < 1e-5


def test_clip_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    tau = 0.07
    s = [[sum(img[i, k].item() * txt[j, k].item() for k in range(8)) / tau for j in range(5)] for i in range(5)]
    i2t = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(5))) for i in range(5)) / 5
    t2i = -sum(s[i][i] - math.log(sum(math.exp(s[j][i]) for j in range(5))) for i in range(5)) / 5
    got = clip_loss(img, txt, torch.tensor(math.log(1 / tau), dtype=torch.float64))
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # items 0 and 1 share a caption: each row's target is split over both
    targets = torch.eye(5, dtype=torch.float64)
    targets[:2, :2] = 0.5
    dup_i2t = (
        -sum(
            sum(targets[i, j].item() * (s[i][j] - math.log(sum(math.exp(s[i][m]) for m in range(5)))) for j in range(5))
            for i in range(5)
        )
        / 5
    )
    dup_t2i = (
        -sum(
            sum(targets[i, j].item() * (s[j][i] - math.log(sum(math.exp(s[m][i]) for m in range(5)))) for j in range(5))
            for i in range(5)
        )
        / 5
    )
    got = clip_loss(img, txt, torch.tensor(math.log(1 / tau), dtype=torch.float64), targets)
    assert got.item() == pytest.approx((dup_i2t + dup_t2i) / 2, rel=1e-6)


def test_uncertainty_weighting_formula_and_gradient_sign():
    uw = UncertaintyWeighting({"lm": 1.0, "caption": 1.0, "clip": 1.0})
    with torch.no_grad():
        uw.log_sigma.copy_(torch.tensor([0.0, 0.3, -0.2]))
    losses = {
        "lm": torch.tensor(0.5, requires_grad=True),
        "caption": torch.tensor(3.0, requires_grad=True),
        "clip": torch.tensor(2.0, requires_grad=True),
    }
    total, extras = uw(losses)
    sig = [1.0, math.exp(0.3), math.exp(-0.2)]
    want = sum(lv / (2 * s * s) + math.log(s) for lv, s in zip((0.5, 3.0, 2.0), sig))
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert extras["sigma_caption"] == pytest.approx(sig[1], rel=1e-6)
    total.backward()
    # d/ds (L e^{-2s} / 2 + s) = 1 - L e^{-2s}: a small loss pushes its sigma down, a large one up
    want_grad = [1 - lv / (s * s) for lv, s in zip((0.5, 3.0, 2.0), sig)]
    assert uw.log_sigma.grad.tolist() == pytest.approx(want_grad, rel=1e-6)
    assert uw.log_sigma.grad[0] > 0 > uw.log_sigma.grad[1]
    assert losses["lm"].grad.item() == pytest.approx(0.5, rel=1e-6)
    # a loss missing from the batch leaves its sigma with a zero gradient
    uw.zero_grad()
    total, _ = uw({"lm": torch.tensor(0.5), "caption": None, "clip": None})
    total.backward()
    assert uw.log_sigma.grad[1:].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# routing, cross-attention, generation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_modality_aware_routing_uses_only_reserved_experts():
    cfg = small_cfg("model.moe.modality_experts={image: [1, 3], audio: [0, 2]}")
    model = build_multimodal_model(cfg, seed=0).eval()
    batch = make_batch(cfg)
    seen = []
    hooks = [
        m.router.register_forward_hook(lambda mod, args, out: seen.append((args[1], out.indices)))
        for m in model.moe_layers()
    ]
    model(batch)
    for h in hooks:
        h.remove()
    main = [(mod, idx) for mod, idx in seen if mod is not None and mod.numel() == batch["input_ids"].numel()]
    assert len(main) == cfg.model.n_layers
    for mod, idx in main:
        assert set(idx[mod == 1].unique().tolist()) <= {1, 3}
        assert set(idx[mod == 2].unique().tolist()) <= {0, 2}
        assert set(idx[mod == 0].unique().tolist()) - {1, 3}  # text keeps every expert
    with pytest.raises(ConfigError, match="model.moe.modality_experts.image"):
        small_cfg("model.moe.modality_experts={image: [1]}")  # fewer than top_k


@torch.no_grad()
def test_cross_attention_starts_as_identity_and_is_causal(model, cfg):
    xcfg = small_cfg("model.multimodal.cross_attention=true")
    xmodel = build_multimodal_model(xcfg, seed=0).eval()
    xmodel.load_state_dict(model.state_dict(), strict=False)
    batch = make_batch(cfg)
    assert len(xmodel.cross_attn) == cfg.model.n_layers
    assert (xmodel(batch).logits - model(batch).logits).abs().max() == 0  # tanh(0) gate
    for layer in xmodel.cross_attn:
        layer.gate.fill_(1.0)
    logits = xmodel(batch).logits
    changed = (logits - model(batch).logits).abs().amax(-1) > 1e-6
    mod, seg = batch["modality"], batch["segment_ids"]
    for b in range(mod.shape[0]):
        for s in seg[b].unique().tolist():
            cols = (seg[b] == s).nonzero().squeeze(1)
            has_media = bool((mod[b, cols] > 0).any())
            first_media = cols[(mod[b, cols] > 0).nonzero()[0, 0]] if has_media else None
            for c in cols.tolist():
                # only tokens after a media item of their own sample see it
                assert bool(changed[b, c]) == (has_media and c > first_media), (b, c)
    assert isinstance(xmodel.cross_attn[0], GatedCrossAttention)


def test_cross_attention_gradients_under_activation_checkpointing():
    cfg = small_cfg("model.multimodal.cross_attention=true")
    plain = build_multimodal_model(cfg, seed=2)
    with torch.no_grad():
        for layer in plain.cross_attn:
            layer.gate.fill_(0.5)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    assert ckpt.lm.activation_checkpointing and not plain.lm.activation_checkpointing
    batch = make_batch(cfg, rows=4)
    plain(batch).loss.backward()
    ckpt(batch).loss.backward()
    ref = dict(plain.named_parameters())
    diff = max((p.grad - ref[n].grad).abs().max().item() for n, p in ckpt.named_parameters() if p.grad is not None)
    assert diff < 1e-6 and ckpt.cross_attn[0].gate.grad.abs() > 0


@pytest.mark.parametrize("cross", [False, True])
@torch.no_grad()
def test_kv_cached_generation_equals_full_recompute(cross):
    cfg = small_cfg(*(["model.multimodal.cross_attention=true"] if cross else []))
    model = build_multimodal_model(cfg, seed=1).eval()
    for layer in model.cross_attn:
        layer.gate.fill_(0.5)
    batch = make_batch(cfg, rows=2, per_row=1)
    cut = int((batch["modality"] > 0).nonzero()[:, 1].max()) + 3  # both rows: media + a little text
    prompt = {
        "input_ids": batch["input_ids"][:, :cut],
        "modality": batch["modality"][:, :cut],
        "image": batch["image"],
        "audio": batch["audio"],
        "audio_frames": batch["audio_frames"],
    }
    got = model.generate(prompt, max_new_tokens=6)
    tokens = prompt["input_ids"]
    for _ in range(6):  # no cache: full forward each step
        full = dict(prompt, input_ids=tokens, modality=F.pad(prompt["modality"], (0, tokens.shape[1] - cut)))
        logits = model.run_trunk(full, model.encode_media(full)).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, tokens)


@torch.no_grad()
def test_answer_logprobs_match_brute_force(model, cfg):
    batch = make_batch(cfg, rows=2, per_row=1)
    lengths = [int((batch["modality"][b] > 0).nonzero().max()) + 3 for b in range(2)]
    width = max(lengths)
    seg = torch.stack([(torch.arange(width) < n).long() for n in lengths])
    prompt = {
        "input_ids": batch["input_ids"][:, :width] * seg,
        "modality": batch["modality"][:, :width] * seg,
        "segment_ids": seg,
        "image": batch["image"],
        "audio": batch["audio"],
        "audio_frames": batch["audio_frames"],
    }
    candidates = [[20], [21, 22], [23, 24, 25]]
    got = model.answer_logprobs(prompt, candidates)
    for b, n in enumerate(lengths):
        for c, cand in enumerate(candidates):
            ids = torch.cat([prompt["input_ids"][b : b + 1, :n], torch.tensor([cand])], 1)
            one = {"input_ids": ids, "modality": F.pad(prompt["modality"][b : b + 1, :n], (0, len(cand)))}
            kind = "image" if b == 0 else "audio"
            one[kind] = prompt[kind]
            if kind == "audio":
                one["audio_frames"] = prompt["audio_frames"]
            logp = model.run_trunk(one, model.encode_media(one)).logits[0].log_softmax(-1)
            want = sum(logp[n - 1 + i, tok].item() for i, tok in enumerate(cand))
            assert got[b, c].item() == pytest.approx(want, abs=1e-4)


@torch.no_grad()
def test_contrastive_embeddings_are_normalised(model, cfg):
    batch = make_batch(cfg)
    img, txt = model.encode_image(batch["image"]), model.encode_text(batch["image_caption_ids"])
    assert img.shape == txt.shape == (batch["image"].shape[0], cfg.model.multimodal.clip_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img))) and torch.allclose(
        txt.norm(dim=-1), torch.ones(len(txt))
    )


# ---------------------------------------------------------------------------------------------
# config, parallel ranks, training
# ---------------------------------------------------------------------------------------------


def test_config_errors_name_their_keys():
    with pytest.raises(ConfigError) as e:
        small_cfg(
            "model.multimodal.image_size=18",
            "model.multimodal.gate_init=1.5",
            "model.multimodal.encoder_heads=3",
            "model.moe.modality_experts={smell: [0, 1]}",
        )
    text = str(e.value)
    for key in (
        "model.multimodal.image_size=18",
        "model.multimodal.gate_init",
        "model.multimodal.encoder_dim",
        "model.moe.modality_experts.smell",
    ):
        assert key in text
    cfg = load_config("configs/tiny_multimodal_cpu.yaml")
    assert cfg.model.multimodal.enabled and cfg.data.dir == "data/demo/multimodal"


def _parallel_worker(cfg, tp, ep):
    from aion_train.parallel.collectives import gather_last
    from aion_train.parallel.parallelize import full_slice

    groups = build_groups(tp, ep)
    full = build_multimodal_model(cfg, seed=3)
    ref_model = copy.deepcopy(full)
    batch = make_batch(cfg, seed=5, rows=4)  # two items of every kind
    ref = ref_model(batch)
    ref.loss.backward()
    model = parallelize_multimodal(full, groups)
    spec = ParallelPlan.from_config(full.cfg, tp, ep).shard_spec(groups.tp_rank, groups.ep_rank)
    out = model(batch)
    out.loss.backward()
    logits = gather_last(out.logits.detach(), groups.tp_group if tp > 1 else None)
    ref_grads = dict(ref_model.named_parameters())
    grad_diff = 0.0
    if ep == 1:  # same batch on every rank: TP gradients equal the single process's slices
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            want = full_slice(ref_grads[name].grad, spec.get(name, []))
            grad_diff = max(grad_diff, (p.grad - want).abs().max().item())
    return {
        "logit": (logits - ref.logits).abs().max().item(),
        "loss": abs(out.loss.item() - ref.loss.item()),
        "losses": {k: abs(v.item() - ref.losses[k].item()) for k, v in out.losses.items()},
        "grad": grad_diff,
        "sharded": len(spec),
    }


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2)])
def test_tp_and_ep_ranks_match_single_process(tp, ep):
    cfg = small_cfg(
        f"parallel.tp={tp}",
        f"parallel.ep={ep}",
        "model.n_kv_heads=2",
        "model.moe.modality_experts={image: [0, 3]}",
        world_size=2,
    )
    r = run_ranks(_parallel_worker, 2, cfg, tp, ep, timeout_s=90)
    assert r["sharded"] > 0
    assert r["logit"] < 1e-5 and r["loss"] < 1e-5
    assert max(r["losses"].values()) < 1e-5 and set(r["losses"]) == {"lm", "caption", "clip", "aux"}
    assert r["grad"] < 1e-5


def test_thirty_steps_lower_every_loss():
    cfg = small_cfg()
    model = build_multimodal_model(cfg, seed=0).train()
    batches = [make_batch(cfg, seed=s, rows=4) for s in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for step in range(30):
        out = model(batches[step % 2])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        history.append({k: v.item() for k, v in out.losses.items()})
    for name in ("lm", "caption", "clip"):
        first = sum(h[name] for h in history[:2]) / 2
        last = sum(h[name] for h in history[-2:]) / 2
        assert last < 0.8 * first, (name, first, last)
    assert history[-1]["aux"] < history[0]["aux"]  # the router z-loss part falls too
