"""Serving a multimodal checkpoint: a tiny multimodal model (built here, its media gates
opened so the media matter) saved as a checkpoint, served on loopback and asked with the
official `openai` client; its greedy tokens are checked against the model's own KV-cached
loop (`MultimodalModel.generate`) on the same fused inputs, the media cache by its encoder
count, batching invariance in fp32, and each error in OpenAI's shape."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from serve_fixtures import serving

from aion_train.config import load_config

pytest.importorskip("openai")

SMALL = [
    "model.vocab_size=384",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.d_ff=64",
    "model.moe.d_ff_expert=32",
    "model.max_seq_len=96",
    "model.kernels=torch",
    "model.multimodal.encoder_dim=32",
    "model.multimodal.encoder_heads=2",
    "model.multimodal.resampler_queries=4",
    "model.multimodal.clip_dim=16",
    "model.multimodal.image_size=16",
    "model.multimodal.patch_size=4",
    "model.multimodal.video_frames=4",
    "model.multimodal.max_audio_frames=40",
    "data.seq_len=64",
]


def png(seed: int, size: int = 20) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def huge_png() -> bytes:
    """A 5000x5000 1-bit PNG: a few KB that would decode to 75 MB of RGB."""
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


def wav(seed: int, seconds: float = 0.3) -> bytes:
    from aion_train.data.multimodal.decode import write_wav

    t = np.arange(int(16000 * seconds)) / 16000
    return write_wav(0.5 * np.sin(2 * math.pi * (200 + 50 * seed) * t), 16000)


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _make_run(root, cross: bool):
    from aion_train.checkpoint.reshard import save_sharded_checkpoint
    from aion_train.data.tokenizer import train_tokenizer
    from aion_train.model.multimodal import build_multimodal_model

    root.mkdir(parents=True, exist_ok=True)
    words = "red blue green circle square triangle what shape is this picture a the of sound speech video".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 12)) + f" {i} {chr(97 + i % 26)}" for i in range(300)]
    tok_path = train_tokenizer(docs, str(root / "tok.model"), 360)
    extra = ["model.multimodal.cross_attention=true"] if cross else []
    cfg = load_config("configs/tiny_multimodal_cpu.yaml", SMALL + extra)
    model = build_multimodal_model(cfg, seed=3)
    with torch.no_grad():
        for proj in model.projections.values():
            proj.alpha.fill_(2.0)  # gate 0.88: the media tokens matter
            proj.proj.weight.mul_(8.0)
        for layer in model.cross_attn:
            layer.gate.fill_(0.8)
    run = root / "run"
    save_sharded_checkpoint(run, cfg.model, model.state_dict())
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": tok_path}}))
    return run


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("mm"), cross=False)


@pytest.fixture(scope="module")
def loaded(mm_run):
    from aion_train.serve.loading import load_for_serving

    return load_for_serving(str(mm_run))


def reference_tokens(loaded, messages, max_new: int) -> list[int]:
    """The model's own greedy loop on the fused prompt, a full forward per token (no engine,
    no KV cache, no media cache); ids the tokenizer cannot decode are never picked (as served)."""
    from aion_train.model.multimodal.fusion import KINDS

    p = loaded.render_media_chat(messages)
    batch = {"input_ids": torch.tensor([p.ids]), "modality": torch.tensor([p.modality])}
    for kind in KINDS:
        items = [m.data for m in p.media if m.kind == kind]
        if items:
            batch[kind] = torch.stack(items)
            if kind == "audio":
                batch["audio_frames"] = torch.tensor([x.shape[0] for x in items])
    out = []
    with torch.no_grad():
        media = loaded.model.encode_media(batch)
        for _ in range(max_new):
            ids = torch.tensor([p.ids + out])
            full = dict(batch, input_ids=ids, modality=torch.tensor([p.modality + [0] * len(out)]))
            nxt = int(loaded.model.run_trunk(full, media).logits[0, -1, : loaded.vocab_size].argmax())
            if nxt in loaded.eos_ids:
                break
            out.append(nxt)
    return out


def image_message(raw: bytes, text: str = "what shape is this") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_url(raw)}},
            ],
        }
    ]


def test_openai_client_image_part_equals_the_model_loop_and_the_cache_hits(mm_run, loaded):
    msgs = image_message(png(1))
    want = reference_tokens(loaded, msgs, 12)
    other = reference_tokens(loaded, image_message(png(2)), 12)
    with serving(mm_run) as s:
        r = s.client.chat.completions.create(model=s.model, messages=msgs, max_tokens=12, temperature=0, seed=1)
        got = s.service.tokenizer.decode(want)
        assert r.choices[0].message.content == got
        assert s.service.media_stats() == {"encodes": 1, "hits": 0}
        # turn 2 about the same image: its tokens come from the cache, not the encoder
        turn2 = msgs + [{"role": "assistant", "content": got}, {"role": "user", "content": "and its colour"}]
        s.client.chat.completions.create(model=s.model, messages=turn2, max_tokens=4, temperature=0)
        assert s.service.media_stats() == {"encodes": 1, "hits": 1}
        # streamed: the same text
        chunks = s.client.chat.completions.create(
            model=s.model, messages=msgs, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == got
        assert s.service.media_stats() == {"encodes": 1, "hits": 2}
        card = s.http.get(f"/v1/models/{s.model}").json()
        assert card["aion"]["modalities"] == ["text", "image", "audio", "video"]
        metrics = s.http.get("/metrics").text
        assert 'aion_media_cache_lookups_total{kind="image",result="hit"} 2.0' in metrics
    assert 'aion_media_cache_lookups_total{kind="image",result="miss"} 1.0' in metrics
    assert want != other  # the image changes the answer


def test_media_change_the_logits(loaded):
    """The gates are open: two images give different next-token logits (the media are used)."""
    from aion_train.serve.media import encode_one

    outs = []
    for seed in (1, 2):
        p = loaded.render_media_chat(image_message(png(seed)))
        emb = loaded.model.lm.embed_tokens(torch.tensor([p.ids]))
        cols = torch.tensor(p.modality).nonzero().squeeze(1)
        emb[0, cols] = encode_one(loaded.model, p.media[0]).tokens
        outs.append(loaded.model.lm(inputs_embeds=emb).logits[0, -1])
    assert (outs[0] - outs[1]).abs().max() > 1e-2


@pytest.fixture(scope="module", params=[False, True], ids=["fused", "cross-attention"])
def engine_setup(request, tmp_path_factory):
    from aion_train.serve.engine import Engine
    from aion_train.serve.loading import load_for_serving

    ld = load_for_serving(str(_make_run(tmp_path_factory.mktemp("eng"), request.param)))
    return ld, Engine(ld.model, ld.eos_ids, ld.vocab_size), request.param


def audio_message(seed: int) -> list[dict]:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(seed)).decode(), "format": "wav"}}
    return [{"role": "user", "content": [part, {"type": "text", "text": "what sound"}]}]


def test_rows_joining_a_running_batch_give_their_tokens_alone(engine_setup):
    """Continuous batching: media rows prefilled and merged into a running text batch (and a
    text row into a running media batch) decode as they do alone."""
    from aion_train.serve.engine import Row
    from aion_train.serve.sampling import SamplingParams

    ld, eng, _ = engine_setup
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    convs = [
        [{"role": "user", "content": "shapes and colours"}],
        image_message(png(7)),
        audio_message(2),
        [{"role": "user", "content": "red"}],
    ]
    prompts = [ld.render_media_chat(m) for m in convs]

    def row(p):
        return Row(list(p.ids), greedy, 8, modality=p.modality, media=p.media or None)

    alone = []
    for p in prompts:
        r = row(p)
        eng.run([r])
        alone.append(r.tokens)
    rows = [row(p) for p in prompts]
    batch = eng.prefill(rows[:1])
    batch = eng.step(eng.step(batch))
    batch = eng.merge(batch, eng.prefill(rows[1:3]))
    batch = eng.step(batch)
    batch = eng.merge(batch, eng.prefill(rows[3:]))
    while batch is not None:
        batch = eng.step(batch)
    assert [r.tokens for r in rows] == alone


@pytest.mark.parametrize("cross", [False, True])
def test_engine_batches_media_rows_with_text_rows_as_alone(tmp_path, cross):
    """A text row next to image / audio rows (and rows of different lengths) gives the greedy
    tokens it gets alone, and every media row gives the model's own loop's tokens."""
    from aion_train.serve.engine import Engine, Row
    from aion_train.serve.loading import load_for_serving
    from aion_train.serve.sampling import SamplingParams

    ld = load_for_serving(str(_make_run(tmp_path, cross)))
    eng = Engine(ld.model, ld.eos_ids, ld.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    convs = [
        image_message(png(5)),
        [{"role": "user", "content": "a plain question about shapes"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(1)).decode(), "format": "wav"}}
                ],
            }
        ],
        image_message(png(6), "square"),
    ]
    prompts = [ld.render_media_chat(m) for m in convs]

    def row(p):
        return Row(list(p.ids), greedy, 10, modality=p.modality, media=p.media or None)

    alone = []
    for p in prompts:
        r = row(p)
        eng.run([r])
        alone.append(r.tokens)
    kv_calls = []
    hooks = [layer.kv.register_forward_hook(lambda *a: kv_calls.append(1)) for layer in ld.model.cross_attn]
    rows = [row(p) for p in prompts]
    encodes = eng.media_cache.encodes
    eng.run(rows)
    for h in hooks:
        h.remove()
    assert [r.tokens for r in rows] == alone
    # the media were encoded (and, with cross-attention, their K/V projected) in the runs alone
    assert eng.media_cache.encodes == encodes == 3 and kv_calls == []
    assert len(ld.model.cross_attn) == (2 if cross else 0)
    for conv, toks in zip(convs, alone):
        assert toks == reference_tokens(ld, conv, 10)


def test_generate_command_with_an_image(mm_run, loaded, tmp_path, capsys):
    from aion_train.cli import main

    f = tmp_path / "x.png"
    f.write_bytes(png(1))
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(mm_run),
            "what shape is this",
            "--image",
            str(f),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["token_ids"] == reference_tokens(loaded, image_message(png(1)), 12)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["generate", "--checkpoint", str(mm_run), "x", "--image", str(bad)]) == 2
    assert "undecodable image" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(mm_run), "x", "--audio", str(bad)]) == 2
    assert "WAV" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(mm_run), "x", "--image", str(tmp_path / "nope.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_generate_refuses_media_for_a_text_checkpoint(tmp_path, capsys):
    from aion_train.checkpoint.reshard import save_sharded_checkpoint
    from aion_train.cli import main
    from aion_train.model import build_model

    cfg = load_config("configs/tiny_cpu.yaml", ["model.d_model=32", "model.d_ff=64", "model.moe.d_ff_expert=32"])
    save_sharded_checkpoint(tmp_path / "run", cfg.model, build_model(cfg.model, seed=0).state_dict())
    f = tmp_path / "x.png"
    f.write_bytes(png(1))
    tok = _make_tok(tmp_path)
    rc = main(["generate", "--checkpoint", str(tmp_path / "run"), "--tokenizer", tok, "hi", "--image", str(f)])
    assert rc == 2 and "text-only checkpoint" in capsys.readouterr().err


def _make_tok(root) -> str:
    from aion_train.data.tokenizer import train_tokenizer

    docs = [f"some words {i} of text for a tokenizer {chr(97 + i % 26)}" for i in range(300)]
    return train_tokenizer(docs, str(root / "t.model"), 360)


def test_errors_in_openai_shape(mm_run):
    from aion_train.serve.media import MAX_MEDIA_PER_REQUEST

    good = {"type": "image_url", "image_url": {"url": data_url(png(1))}}
    cases = {
        "invalid_media": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}],
        "undecodable": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
        "bad_b64": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
        "bad_wav": [{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "wav"}}],
        "mp3": [{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "mp3"}}],
        "too_many_media": [good] * (MAX_MEDIA_PER_REQUEST + 1),
        "bad_frames": [{"type": "video", "video": ["data:image/png;base64,aGVsbG8="]}],
        "huge": [{"type": "image_url", "image_url": {"url": data_url(huge_png())}}],
    }
    with serving(mm_run) as s:
        for name, parts in cases.items():
            body = {"model": s.model, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
            r = s.http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"].startswith("messages.0.content"), err
            if name == "too_many_media":
                assert err["code"] == "too_many_media"
            if name == "invalid_media":
                assert "fetches nothing" in err["message"]
            if name == "huge":
                assert "over the limit" in err["message"]
            if name == "undecodable":
                assert "undecodable image" in err["message"]
        # a video clip of frames works
        frames = [data_url(png(i)) for i in range(3)]
        body = {
            "model": s.model,
            "messages": [{"role": "user", "content": [{"type": "video", "video": frames}]}],
            "max_tokens": 2,
        }
        assert s.http.post("/v1/chat/completions", json=body).status_code == 200


def test_media_to_a_text_only_model(tmp_path):
    from aion_train.checkpoint.reshard import save_sharded_checkpoint
    from aion_train.model import build_model

    cfg = load_config("configs/tiny_cpu.yaml", ["model.d_model=32", "model.d_ff=64", "model.moe.d_ff_expert=32"])
    run = tmp_path / "run"
    save_sharded_checkpoint(run, cfg.model, build_model(cfg.model, seed=0).state_dict())
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": _make_tok(tmp_path)}}))
    with serving(run) as s:
        parts = [{"type": "image_url", "image_url": {"url": data_url(png(1))}}]
        body = {"model": s.model, "messages": [{"role": "user", "content": parts}]}
        r = s.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "media_unsupported", r.text


def test_media_cache_is_bounded_lru(loaded):
    """By entries and by bytes, the least recently used item goes first; a hit refreshes it."""
    from aion_train.serve.media import MediaCache, decode_image

    mm = loaded.media_config
    items = [decode_image(png(10 + i), mm) for i in range(4)]
    c = MediaCache(max_entries=2)
    for it in items[:2]:
        c.get(loaded.model, it)
    c.get(loaded.model, items[0])  # refresh 0: 1 is now the oldest
    c.get(loaded.model, items[2])
    assert len(c) == 2 and (c.encodes, c.hits) == (3, 1)
    c.get(loaded.model, items[0])
    assert (c.encodes, c.hits) == (3, 2)
    c.get(loaded.model, items[1])  # evicted: encoded again
    assert c.encodes == 4
    one = c.get(loaded.model, items[3]).nbytes
    small = MediaCache(max_bytes=2 * one)
    for it in items:
        small.get(loaded.model, it)
    assert len(small) == 2 and small.bytes == 2 * one
    same = decode_image(png(10), mm)  # the same bytes decoded again: the same key
    assert same.sha256 == items[0].sha256 and c.get(loaded.model, same) is c.get(loaded.model, items[0])


def test_no_retrieval_index_with_a_multimodal_checkpoint(mm_run, tmp_path):
    with pytest.raises(ValueError, match="multimodal checkpoint"):
        with serving(mm_run, index=tmp_path):
            pass


def test_concurrent_requests_through_the_server_equal_alone(mm_run, loaded):
    """Image, audio and text chats sent at once (the scheduler batches what arrives together)
    each get the model loop's tokens."""
    from concurrent.futures import ThreadPoolExecutor

    convs = [image_message(png(20 + i)) for i in range(3)] + [audio_message(3)]
    convs += [[{"role": "user", "content": "circle or square"}], image_message(png(20), "colour")]
    want = [loaded.tokenizer.decode(reference_tokens(loaded, m, 8)) for m in convs]
    with serving(mm_run, max_batch=4, max_body_bytes=1 << 20) as s:

        def ask(m):
            r = s.client.chat.completions.create(model=s.model, messages=m, max_tokens=8, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(ask, convs))
        assert got == want
        assert s.service.media_stats()["encodes"] == 4  # png(20) twice: encoded once


@pytest.mark.parametrize("cross", [False, True])
def test_bf16_serving_runs(tmp_path, cross):
    from aion_train.serve.engine import Engine, Row
    from aion_train.serve.loading import load_for_serving
    from aion_train.serve.sampling import SamplingParams

    ld = load_for_serving(str(_make_run(tmp_path, cross)), dtype="bf16")
    eng = Engine(ld.model, ld.eos_ids, ld.vocab_size)
    prompts = [
        ld.render_media_chat(m) for m in (image_message(png(1)), audio_message(1), [{"role": "user", "content": "hi"}])
    ]
    rows = [
        Row(list(p.ids), SamplingParams(temperature=0.0, max_tokens=4), 4, modality=p.modality, media=p.media or None)
        for p in prompts
    ]
    eng.run(rows)
    assert all(r.finish_reason in ("length", "stop") for r in rows) and eng.media_cache.encodes == 2
    assert next(iter(eng.media_cache._d.values())).tokens.dtype == torch.bfloat16
