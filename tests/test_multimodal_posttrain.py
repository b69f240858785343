"""Multimodal post-training: the media task's prompts, SFT -> reward model -> PPO on them,
the per-item media cache of rollouts, router replay, and TP=2 / EP=2 PPO steps against the
single process."""

from __future__ import annotations

import base64
import copy
import hashlib
import json

import pytest
import torch

from aion_train.config import load_config
from aion_train.parallel import run_ranks

SMALL = [
    "sft.mm_train_per_kind=12",
    "sft.mm_eval_per_kind=4",
    "sft.mm_ppo_per_kind=8",
    "sft.steps=4",
    "sft.batch_size=8",
    "rm.steps=4",
    "rm.batch_size=8",
    "rm.train_pairs=24",
    "rm.eval_pairs=8",
    "ppo.steps=2",
    "ppo.rollout_prompts=8",
    "ppo.save_every=1",
    "train.zero_stage=0",
]


def _tokenizer(path) -> str:
    from aion_train.data.multimodal.sources import easy_vqa_answers, easy_vqa_records
    from aion_train.data.tokenizer import train_tokenizer
    from aion_train.posttrain.multimodal.task import VIDEO_QUESTION

    recs = easy_vqa_records("train")[:300]
    docs = [f"{q} {a}" for r in recs for q, a in r["qa"]] + [VIDEO_QUESTION] + easy_vqa_answers()
    docs += ["down left right up"] * 20
    return train_tokenizer(docs, str(path), 300)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(tokenizer path, a multimodal base checkpoint: random weights, media gates open)."""
    from aion_train.checkpoint.reshard import save_sharded_checkpoint
    from aion_train.model.multimodal import build_multimodal_model

    root = tmp_path_factory.mktemp("mmpost")
    tok = _tokenizer(root / "tok.model")
    cfg = load_config("configs/pipeline_multimodal_tiny.yaml", ["model.vocab_size=304"])
    model = build_multimodal_model(cfg, seed=3)
    with torch.no_grad():
        for proj in model.projections.values():
            proj.alpha.fill_(2.0)  # gate 0.88: the media tokens matter
    save_sharded_checkpoint(root / "base", cfg.model, model.state_dict())
    return tok, str(root / "base")


def mm_cfg(base, run_dir, *extra, world_size=None):
    tok, ckpt = base
    return load_config(
        "configs/pipeline_multimodal_tiny.yaml",
        SMALL
        + [f"run_dir={run_dir}", f"data.tokenizer={tok}", f"sft.init_from={ckpt}", "model.vocab_size=304"]
        + list(extra),
        world_size=world_size,
    )


@pytest.fixture(scope="module")
def task(base, tmp_path_factory):
    from aion_train.posttrain.multimodal.task import build_mm_task

    cfg = mm_cfg(base, tmp_path_factory.mktemp("task"))
    return cfg, build_mm_task(cfg)


def _data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def test_prompts_are_the_served_chat_layout_with_media_and_no_scene_text(task):
    """Every prompt is what `aion-train serve` renders from OpenAI content parts: media blocks
    with R placeholders each, then <T> and the written question (nothing for a spoken one); no
    textual description of the media anywhere in the prompt."""
    from pathlib import Path

    from aion_train.data.multimodal.sources import easy_vqa_records
    from aion_train.posttrain.multimodal.task import MODALITIES, VIDEO_QUESTION
    from aion_train.serve.mm_prompt import parse_messages, render

    cfg, t = task
    mm, tok = cfg.model.multimodal, t.tokenizer
    sha = lambda raw: hashlib.sha256(raw).hexdigest()  # noqa: E731
    pngs = {sha(b): b for b in (Path(r["path"]).read_bytes() for s in ("train", "test") for r in easy_vqa_records(s))}
    kinds = {}
    for split in ("sft", "train", "test"):
        for e in t.prompts(split):
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
            text_ids = [i for i, m in zip(e.prompt.ids, e.prompt.modality) if m == 0]
            text = tok.decode(text_ids)
            written = {"image": e.question, "spoken": "", "video": VIDEO_QUESTION}[e.kind]
            for delim in ("<I>", "</I>", "<A>", "</A>", "<V>", "</V>", "<T>"):
                text = text.replace(delim, " ")
            assert " ".join(text.split()) == written
            assert "scene" not in text
            assert [m.kind for m in e.prompt.media] == list(MODALITIES[e.kind])
            for kind_id in (1, 2, 3):
                n_items = sum(m.kind == ("image", "audio", "video")[kind_id - 1] for m in e.prompt.media)
                assert e.prompt.modality.count(kind_id) == n_items * mm.resampler_queries
            if e.kind == "video":
                # the answer is the motion: the question names no colour, shape or direction
                assert not set(text.split()) & {"left", "right", "up", "down"}
    assert kinds["image"] == kinds["spoken"] == kinds["video"] == 12 + 8 + 4
    # PPO's prompts are about images that SFT and the reward model never see
    seen = {e.prompt.media[0].sha256 for e in t.prompts("sft") if e.kind != "video"}
    assert seen and not seen & {e.prompt.media[0].sha256 for e in t.prompts("train") if e.kind != "video"}
    # the same request through the serving layer's parser renders the same ids and media
    spoken = next(e for e in t.prompts("test") if e.kind == "spoken")
    png = pngs[spoken.prompt.media[0].sha256]
    speech = [p.read_bytes() for p in (Path(cfg.run_dir) / "task" / "speech").glob("*.wav")]
    wav = next(raw for raw in speech if sha(raw) == spoken.prompt.media[1].sha256)
    parts = [
        {"type": "image_url", "image_url": {"url": _data_url(png)}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
    ]
    served = render(tok, mm, parse_messages([{"role": "user", "content": parts}], mm))
    assert served.ids == spoken.prompt.ids and served.modality == spoken.prompt.modality
    assert [m.sha256 for m in served.media] == [m.sha256 for m in spoken.prompt.media]
    assert all(torch.equal(a.data, b.data) for a, b in zip(served.media, spoken.prompt.media))


def test_sft_rm_ppo_commands_on_media_prompts(base, tmp_path, capsys):
    """`aion-train sft / rm / ppo` on a multimodal config (a few steps): what each prints,
    the SFT accuracy recomputed from the saved adapters, PPO's reference (adapters merged)
    answering as the SFT phase's adapter model did, finite KL, router replay on."""
    from aion_train.cli import main
    from aion_train.posttrain.common import read_done
    from aion_train.posttrain.multimodal.rollout import evaluate_accuracy
    from aion_train.posttrain.multimodal.sft import load_mm_policy

    tok, ckpt = base
    over = SMALL + [
        f"run_dir={tmp_path / 'run'}",
        f"data.tokenizer={tok}",
        f"sft.init_from={ckpt}",
        "model.vocab_size=304",
        "ppo.router_replay=true",
    ]
    last = lambda: json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # noqa: E731
    config = "configs/pipeline_multimodal_tiny.yaml"
    assert main(["sft", "--config", config, "--json", *over]) == 0
    sft = last()
    assert sft["modalities"] == ["audio", "image", "text", "video"]
    assert sft["eval_examples"] == 12 and set(sft["sft_accuracy_by_kind"]) == {"image", "spoken", "video"}
    cfg = mm_cfg(base, tmp_path / "run", "ppo.router_replay=true")
    model, task = load_mm_policy(cfg, merge=True)
    again = evaluate_accuracy(model, task, task.prompts("test"), cfg.sft.max_new_tokens)
    assert again["accuracy"] == pytest.approx(sft["sft_accuracy"]) and again["by_kind"] == sft["sft_accuracy_by_kind"]
    assert main(["rm", "--config", config, "--json", *over]) == 0
    rm = last()
    assert rm["rm_eval_pairs"] == 8 and 0.0 <= rm["rm_pair_accuracy"] <= 1.0
    assert main(["ppo", "--config", config, "--json", *over]) == 0
    ppo = last()
    assert ppo["router_replay"] is True and ppo["iterations"] == 2
    assert ppo["sft_accuracy"] == pytest.approx(sft["sft_accuracy"])
    assert ppo["sft_accuracy_by_kind"] == pytest.approx(sft["sft_accuracy_by_kind"])
    assert torch.isfinite(torch.tensor(ppo["ppo_kl"])) and ppo["ppo_kl_k3"] >= 0
    assert read_done(cfg, "ppo")["modalities"] == ppo["modalities"]


def letters(prompts, completions, **_):
    """A rule reward: the share of ASCII letters in the answer."""
    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("replay", [False, True])
def test_ppo_updates_move_each_media_rollout_along_its_advantage(base, tmp_path, replay):
    """A rollout batch over image / audio / video prompts scored by a rule reward, then PPO
    updates: each response's log-probability moves in the direction of its advantage (the
    policy-gradient step is wired through the fused sequence, the media and router replay)."""
    from aion_train.posttrain.common import setup_distributed
    from aion_train.posttrain.multimodal.ppo import build_mm_models, make_mm_experience
    from aion_train.posttrain.phases import run_sft
    from aion_train.posttrain.ppo import ppo_update
    from aion_train.posttrain.rollout import response_logprobs

    cfg = mm_cfg(
        base,
        tmp_path / "run",
        "ppo.reward=test_multimodal_posttrain:letters",
        "ppo.critic_init=sft",
        "ppo.rollout_prompts=16",
        f"ppo.router_replay={str(replay).lower()}",
    )
    run_sft(cfg)
    groups = setup_distributed(cfg)
    actor, critic, ref, reward, task = build_mm_models(cfg, groups)
    gen = torch.Generator().manual_seed(0)
    batch = make_mm_experience(task.prompts("train")[::2], actor.module, ref, critic.module, reward, task, cfg.ppo, gen)
    assert (batch.routes is not None) == replay
    assert {m.kind for row in batch.context["media"] for m in row} == {"image", "audio", "video"}

    def seq_logp():
        with torch.no_grad():
            lp = response_logprobs(
                actor.module, batch.input_ids, batch.resp_pos, batch.resp_tokens, groups, context=batch.context
            )
        return (lp * batch.resp_mask).sum(1)

    before = seq_logp()
    assert torch.allclose(before, batch.logp_old.sum(1), atol=1e-5)
    for _ in range(3):
        ppo_update(actor, critic, batch, cfg.ppo, groups, gen)
    moved, adv = seq_logp() - before, (batch.advantages * batch.resp_mask).sum(1)
    assert float(torch.corrcoef(torch.stack([moved, adv]))[0, 1]) > 0.6
    assert float(((moved > 0) == (adv > 0)).float().mean()) >= 0.75


def test_rollout_media_are_encoded_once_per_item(base, task, tmp_path):
    """A frozen media path: the first rollout over a set of prompts encodes each distinct item
    once per model (actor, reference, critic, reward model); a second rollout over the same
    prompts encodes nothing, and gives the same scores for the same sampled responses."""
    from aion_train.posttrain.common import setup_distributed
    from aion_train.posttrain.multimodal.models import FusedCritic, FusedLM, FusedRewardModel, build_mm_model
    from aion_train.posttrain.multimodal.ppo import make_mm_experience
    from aion_train.posttrain.multimodal.sft import freeze_media_path

    cfg, t = task
    groups = setup_distributed(cfg)
    models = []
    for _ in range(4):
        m = build_mm_model(cfg, groups)
        freeze_media_path(m)
        models.append(m)
    calls = []
    for i, m in enumerate(models):
        orig = m.encode_media

        def counting(batch, orig=orig, i=i):
            calls.append((i, sum(batch[k].shape[0] for k in ("image", "audio", "video") if k in batch)))
            return orig(batch)

        m.encode_media = counting
    actor, ref = FusedLM(models[0]), FusedLM(models[1])
    critic, rm = FusedCritic(models[2], cfg.model.d_model), FusedRewardModel(models[3], cfg.model.d_model)
    examples = t.prompts("test")
    distinct = len({(it.kind, it.sha256) for e in examples for it in e.prompt.media})
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)
        runs.append(make_mm_experience(examples, actor, ref, critic, rm, t, cfg.ppo, gen))
        counts = [sum(n for j, n in calls if j == i) for i in range(4)]
        calls.clear()
        assert counts == ([distinct] * 4 if len(runs) == 1 else [0] * 4)
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert torch.allclose(runs[0].scores, runs[1].scores) and torch.allclose(runs[0].logp_old, runs[1].logp_old)


def test_fused_reward_of_a_padded_row_equals_the_row_alone(task):
    from aion_train.model.multimodal import build_multimodal_model
    from aion_train.posttrain.multimodal.models import FusedRewardModel
    from aion_train.posttrain.multimodal.rollout import sequences

    cfg, t = task
    rm = FusedRewardModel(build_multimodal_model(cfg, seed=1), cfg.model.d_model).eval()
    with torch.no_grad():
        rm.head.weight.normal_()
    examples = [e for e in t.prompts("test") if e.kind == "spoken"][:1] + [
        e for e in t.prompts("test") if e.kind == "video"
    ][:1]
    responses = [t.answer_ids("yes"), t.answer_ids("left right up")]
    (ids, *_), ctx = sequences(t, examples, responses)
    together = rm(ids, ctx)
    for b in range(2):
        (ids1, *_), ctx1 = sequences(t, examples[b : b + 1], responses[b : b + 1])
        assert ids1.shape[1] < ids.shape[1] or b == 1
        assert torch.allclose(rm(ids1, ctx1), together[b : b + 1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# router replay
# ---------------------------------------------------------------------------------------------


def _moe_lm(seed: int = 0):
    from aion_train.model import build_model

    cfg = load_config("configs/tiny_cpu.yaml", ["model.moe.every=1", "model.moe.n_experts=4", "model.moe.top_k=2"])
    return build_model(cfg.model, seed=seed).eval()


def test_replay_uses_the_recorded_experts_with_the_current_gates():
    from aion_train.model.moe.router_replay import RouterReplay, route_rows

    model = _moe_lm()
    ids = torch.randint(5, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    replay = RouterReplay(model)
    assert len(replay.layers) == model.cfg.n_layers
    with torch.no_grad(), replay.recording():
        before = model(ids).logits
    routes = replay.take()
    assert all(r.shape == (3, 16, 2) for r in routes.values())
    with torch.no_grad(), replay.replaying(routes):  # same weights: replay changes nothing
        assert torch.equal(model(ids).logits, before)
    with torch.no_grad():  # a router update that moves some tokens to other experts
        for moe in model.moe_layers():
            moe.router.weight.add_(0.5 * torch.randn_like(moe.router.weight))
    used = {}
    for name, layer in replay.layers.items():
        orig = layer.dispatcher.dispatch

        def spy(x, indices, gates, name=name, orig=orig):
            used[name] = (indices.clone(), gates.clone())
            return orig(x, indices, gates)

        layer.dispatcher.dispatch = spy
    with torch.no_grad():
        free = model(ids).logits
        moved = {n: not torch.equal(used[n][0].view(3, 16, 2).sort(-1).values, routes[n].sort(-1).values) for n in used}
    assert any(moved.values())
    with replay.replaying(routes):  # and the router keeps its gradient
        out = model(ids).logits
    for name in replay.layers:
        idx, gates = used[name]
        assert torch.equal(idx.view(3, 16, 2), routes[name])
        assert torch.allclose(gates.sum(-1), torch.ones(gates.shape[0]))  # renormalised top-k gates
    assert not torch.allclose(out, free)
    out.square().mean().backward()
    assert all(float(layer.router.weight.grad.abs().sum()) > 0 for layer in replay.layers.values())
    half = route_rows(routes, torch.tensor([2, 0]))
    with torch.no_grad(), replay.replaying(half):
        assert torch.allclose(model(ids[[2, 0]]).logits, out.detach()[[2, 0]], atol=1e-5)


def test_replay_gates_are_the_router_probabilities_at_the_recorded_ids():
    from aion_train.model.moe.router import TopKRouter
    from aion_train.model.moe.router_replay import replay_routing

    router = TopKRouter(8, 4, 2)
    x = torch.randn(5, 8)
    r = router(x)
    forced = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    out = replay_routing(r, forced, normalize=True)
    p = torch.softmax(x @ router.weight.T, -1)
    want = p.gather(-1, forced)
    assert torch.equal(out.indices, forced)
    assert torch.allclose(out.gates, want / want.sum(-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="same tokens"):
        replay_routing(r, forced[:3], normalize=True)


# ---------------------------------------------------------------------------------------------
# TP / EP
# ---------------------------------------------------------------------------------------------


def _media_rows(cfg):
    """Three prompt + response rows holding an image + audio, a video, an image (random media)."""
    from aion_train.posttrain.rollout import build_sequences
    from aion_train.serve.media import MediaInput

    mm = cfg.model.multimodal
    g = torch.Generator().manual_seed(7)
    r = mm.resampler_queries
    p_img = (mm.image_size // mm.patch_size) ** 2, 3 * mm.patch_size**2
    n_tub = (mm.video_frames // mm.tubelet_frames) * (mm.image_size // mm.patch_size) ** 2
    items = {
        "image": lambda k: MediaInput("image", f"i{k}", torch.randn(*p_img, generator=g)),
        "audio": lambda k: MediaInput("audio", f"a{k}", torch.randn(40, mm.n_mels, generator=g)),
        "video": lambda k: MediaInput(
            "video", f"v{k}", torch.randn(n_tub, 3 * mm.tubelet_frames * mm.patch_size**2, generator=g)
        ),
    }
    layouts = [["image", "audio"], ["video"], ["image"]]
    prompts, modality, media = [], [], []
    for k, kinds in enumerate(layouts):
        ids, mod = [], []
        for kind in kinds:
            ids += [7] + [mm.pad_id] * r + [8]
            mod += [0] + [("image", "audio", "video").index(kind) + 1] * r + [0]
        text = torch.randint(10, 200, (3 + k,), generator=g).tolist()
        prompts.append(ids + text)
        modality.append(mod + [0] * len(text))
        media.append([items[kind](k) for kind in kinds])
    responses = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (3, 1, 2)]
    seqs = build_sequences(prompts, responses, 0)
    mod = torch.zeros_like(seqs[0])
    for b, m in enumerate(modality):
        mod[b, : len(m)] = torch.tensor(m)
    return seqs, {"modality": mod, "media": media}


def _ppo_step_worker(cfg, tp, ep):
    from aion_train.model.moe.router_replay import RouterReplay
    from aion_train.model.multimodal import build_multimodal_model
    from aion_train.parallel import build_groups, parallelize_multimodal
    from aion_train.posttrain import ppo_math
    from aion_train.posttrain.lora import load_lora_state_dict, lora_modules, lora_state_dict
    from aion_train.posttrain.multimodal.models import FusedCritic, FusedLM, apply_mm_lora
    from aion_train.posttrain.rollout import response_logprobs, response_values

    groups = build_groups(tp, ep)
    full = build_multimodal_model(cfg, seed=3)
    with torch.no_grad():
        for proj in full.projections.values():
            proj.alpha.fill_(2.0)
    critic_full = copy.deepcopy(full)
    ref = copy.deepcopy(full)
    apply_mm_lora(ref, cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for p in (p for n, p in ref.named_parameters() if ".lora_" in n):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    adapters = lora_state_dict(ref)
    model = parallelize_multimodal(full, groups)
    apply_mm_lora(model, cfg)
    load_lora_state_dict(model, adapters)
    (ids, pos, toks, mask), ctx = _media_rows(cfg)
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(5)) * mask
    returns = torch.randn(mask.shape, generator=torch.Generator().manual_seed(6)) * mask

    def step(m, critic, tp_groups):
        replay = RouterReplay(m)
        with torch.no_grad(), replay.recording():
            old = response_logprobs(FusedLM(m), ids, pos, toks, tp_groups, context=ctx) - 0.1 * mask
        with replay.replaying(replay.take()):
            logp, ent = response_logprobs(FusedLM(m), ids, pos, toks, tp_groups, with_entropy=True, context=ctx)
        loss, _ = ppo_math.clipped_surrogate(logp, old, adv, mask, 0.2)
        loss = loss - 0.01 * ppo_math.masked_mean(ent, mask)
        values = response_values(critic, ids, pos, ctx)
        vloss, _ = ppo_math.clipped_value_loss(values, values.detach() + 0.3, returns, mask, 0.2)
        (loss + vloss).backward()
        return float(loss), float(vloss)

    ref_critic = FusedCritic(critic_full, cfg.model.d_model)
    with torch.no_grad():
        ref_critic.value_head.weight.normal_(generator=torch.Generator().manual_seed(2))
    par_critic = copy.deepcopy(ref_critic)
    parallelize_multimodal(par_critic.backbone, groups)
    want = step(ref, ref_critic, None)
    got = step(model, par_critic, groups)
    diff = 0.0
    ref_mods = lora_modules(ref)
    for name, mod in lora_modules(model).items():
        for which in ("lora_A", "lora_B"):
            grad, full_grad = getattr(mod, which).grad, getattr(ref_mods[name], which).grad
            dim = mod.shard_dim(which)
            if dim is not None:
                full_grad = full_grad.chunk(mod.tp, dim=dim)[mod.tp_rank]
            diff = max(diff, float((grad - full_grad).abs().max()))
    ref_c = dict(ref_critic.named_parameters())
    vdiff = max(
        float((p.grad - ref_c[n].grad).abs().max())
        for n, p in par_critic.named_parameters()
        if n.startswith("value_head") or "encoders" in n
    )
    return {
        "loss": abs(got[0] - want[0]),
        "vloss": abs(got[1] - want[1]),
        "grad": diff,
        "vgrad": vdiff,
        "lora": len(lora_modules(model)),
        "scale": float(ref_mods[next(iter(ref_mods))].lora_A.grad.abs().max()),
    }


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2)])
def test_multimodal_ppo_step_on_tp_ep_ranks_equals_the_single_process(tp, ep, base, tmp_path):
    """One PPO step (clipped surrogate + entropy with router replay, clipped value loss) over
    rows holding image, audio and video, LoRA on the trunk and the media path: loss and
    gradients on 2 ranks equal the single process (fp32)."""
    cfg = mm_cfg(base, tmp_path, f"parallel.tp={tp}", f"parallel.ep={ep}", "lora.encoders=true", world_size=2)
    r = run_ranks(_ppo_step_worker, 2, cfg, tp, ep, timeout_s=120)
    assert r["lora"] > 8 and r["scale"] > 0
    assert r["loss"] < 1e-5 and r["vloss"] < 1e-5
    assert r["grad"] < 1e-5 and r["vgrad"] < 1e-5


def test_the_pipelines_last_line_carries_the_modalities():
    from aion_train.config.pipeline_schema import BUILTIN
    from aion_train.pipeline.runner import summarize

    done = {
        "sft": {"sft_accuracy": 0.5, "modalities": ["audio", "image", "text", "video"], "by_kind": {"image": 0.8}},
        "ppo": {"ppo_accuracy": 0.6, "sft_accuracy": 0.52, "ppo_kl": 0.3, "modalities": ["image", "text"]},
    }
    out = summarize([BUILTIN["sft"], BUILTIN["ppo"]], done, {"sft": "done", "ppo": "done"}, "/r", 1.0)
    assert out["modalities"] == ["image", "text"] and out["sft_accuracy"] == 0.52 and "by_kind" not in out
