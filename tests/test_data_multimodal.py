"""Multimodal data: demo build (determinism, manifest), decoders against numpy / torch
references, the batch contract, rank/worker split, exact resume, skipping corrupt data."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from aion_train.data.multimodal import build as mm_build
from aion_train.data.multimodal import decode as D
from aion_train.data.multimodal.collate import IGNORE, count_samples
from aion_train.data.multimodal.eval_sets import load_caption_eval, load_vqa_eval
from aion_train.data.multimodal.loader import MultimodalLoader
from aion_train.data.shards import iter_shard_samples, read_manifest, verify_manifest, write_shards
from aion_train.data.tokenizer import Tokenizer

SIZES = {
    "vqa_train": 40,
    "vqa_val": 12,
    "digits_train": 20,
    "digits_val": 8,
    "photo_crops": 1,
    "speech_train": 6,
    "speech_val": 2,
    "video_train": 8,
    "video_val": 4,
    "text_train": 30,
    "text_val": 5,
}
VOCAB = 400
R = 8


def _build(out: str) -> dict:
    return mm_build.build_multimodal_demo(out, VOCAB, seed=7, sizes=SIZES, samples_per_shard=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, require_binary):
    require_binary("espeak-ng")  # the speech clips; the decoder tests below need no system package
    out = str(tmp_path_factory.mktemp("mm") / "multimodal")
    return _build(out)


def _loader(demo, **kw):
    args = dict(seq_len=128, micro_batch_size=4, resampler_queries=R, seed=3, shuffle_buffer=16)
    args.update(kw)
    shards = args.pop("shards", demo["train"])
    return MultimodalLoader(shards, demo["tokenizer"], **args)


# ------------------------------------------------------------------ build
def test_build_is_deterministic_and_manifest_counts(demo, tmp_path):
    again = _build(str(tmp_path / "again"))
    d1, d2 = os.path.dirname(demo["tokenizer"]), os.path.dirname(again["tokenizer"])
    m1, m2 = read_manifest(d1), read_manifest(d2)
    assert m1 == m2  # shard names, sizes, sha256, counts
    for a, b in zip(
        demo["train"] + demo["val"] + [demo["tokenizer"]], again["train"] + again["val"] + [again["tokenizer"]]
    ):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), a
    assert verify_manifest(d1, checksums=True) == []
    counts = m1["multimodal"]["counts"]
    assert counts["train"]["kinds"] == {"digit": 20, "photo": 6, "speech": 6, "text": 30, "video": 8, "vqa": 40}
    assert counts["val"]["kinds"] == {"digit": 8, "speech": 2, "text": 5, "video": 4, "vqa": 12}
    assert counts["train"]["modalities"] == {"image": 66, "video": 8, "audio": 6, "text": 30}
    for split, prefix in (("train", mm_build.TRAIN), ("val", mm_build.VAL)):
        s = m1["splits"][prefix]
        assert s["num_samples"] == sum(counts[split]["kinds"].values())
        assert s["fields"]["png"] == counts[split]["modalities"]["image"]
        assert s["fields"]["wav"] == counts[split]["modalities"]["audio"]
    # the samples really are what the manifest says: count members by reading the tars
    n_png = sum("png" in it for p in demo["train"] for it in iter_shard_samples(p))
    assert n_png == 66
    # ensure_* accepts a complete set of the same arguments without rebuilding
    assert mm_build._is_complete(d1, VOCAB, 7, SIZES) and not mm_build._is_complete(d1, VOCAB, 8, SIZES)


def test_speech_clip_is_16k_and_transcript_is_the_text(demo):
    tok = Tokenizer(demo["tokenizer"])
    for p in demo["train"]:
        for it in iter_shard_samples(p):
            if "wav" in it:
                x, rate = D.read_wav(it["wav"])
                meta = json.loads(it["json"])
                assert rate == 16000 and 0.4 < len(x) / rate < 6.0
                assert np.abs(x).max() > 0.05  # not silence
                assert tok.decode(tok.encode(meta["transcript"])) == meta["transcript"]
                return
    pytest.fail("no speech sample")


def test_easy_vqa_captions_agree_with_every_answer_of_the_image():
    from aion_train.data.multimodal.sources import SHAPES, easy_vqa_records

    records = easy_vqa_records("test")
    colors = {a for r in records for _q, a in r["qa"]} - set(SHAPES) - {"yes", "no"}
    captioned = [r for r in records if r["color"] and r["shape"]]
    assert len(captioned) > 0.8 * len(records)
    for r in captioned:
        for q, a in r["qa"]:
            words = q.rstrip("?").split()
            negated = "not" in words or "no" in words
            mentions = r["color"] in words or r["shape"] in words
            assert not (a in colors and a != r["color"]) and not (a in SHAPES and a != r["shape"]), (r, q, a)
            if a == "yes" and any(w in colors | set(SHAPES) for w in words):
                assert mentions != negated, (r, q, a)


# ------------------------------------------------------------------ decoders
def test_patchify_matches_conv_unfold_and_inverts():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    p = 8
    patches = D.patchify(img, p)
    assert patches.shape == (8 * 6, 3 * p * p)
    ref = torch.nn.functional.unfold(
        torch.from_numpy(D.normalize_pixels(img)).permute(2, 0, 1)[None], kernel_size=p, stride=p
    )[0].T  # (c, y, x) per patch, row-major
    np.testing.assert_array_equal(patches, ref.numpy())
    assert patches[6 + 2, 0] == pytest.approx((img[8, 16, 0] / 255 - 0.5) / 0.5)  # patch (1, 2)
    np.testing.assert_allclose(D.unpatchify(patches, 64, 48, p), img / 255.0, atol=1e-6)


def test_tubeletize_matches_explicit_loops_and_inverts():
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    t, p = 2, 8
    tubes = D.tubeletize(clip, t, p)
    assert tubes.shape == (4 * 4 * 4, 3 * t * p * p)
    norm = D.normalize_pixels(clip)
    for ti, yi, xi in [(0, 0, 0), (1, 2, 3), (3, 3, 1)]:
        k = (ti * 4 + yi) * 4 + xi
        ref = norm[ti * t : (ti + 1) * t, yi * p : (yi + 1) * p, xi * p : (xi + 1) * p].transpose(3, 0, 1, 2).ravel()
        np.testing.assert_array_equal(tubes[k], ref)
    np.testing.assert_allclose(D.untubeletize(tubes, 8, 32, 32, t, p), clip / 255.0, atol=1e-6)
    strip = D.join_strip(clip)
    assert strip.shape == (32, 256, 3)
    np.testing.assert_array_equal(D.split_strip(strip, 8), clip)


def test_mel_scale_and_filterbank_triangles():
    # Slaney's scale: linear 200/3 Hz per mel to 1 kHz (mel 15), then 27 mels per factor 6.4
    assert D.hz_to_mel(1000.0) == pytest.approx(15.0)
    assert D.hz_to_mel(6400.0) == pytest.approx(42.0)
    assert D.hz_to_mel(500.0) == pytest.approx(7.5)
    assert D.mel_to_hz(D.hz_to_mel(3210.0)) == pytest.approx(3210.0)
    fb = D.mel_filterbank(norm=False)
    assert fb.shape == (80, 201)
    freqs = np.linspace(0, 8000, 201)
    pts = D.mel_to_hz(np.linspace(0, D.hz_to_mel(8000.0), 82))
    for m in (5, 30, 60, 79):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        k = int(np.argmax(fb[m]))
        expect = (freqs[k] - lo) / (c - lo) if freqs[k] <= c else (hi - freqs[k]) / (hi - c)
        assert fb[m, k] == pytest.approx(expect, abs=1e-6)
        assert abs(freqs[k] - c) <= 20.0 + 1e-9  # the peak bin is the one nearest the centre
        assert np.all(fb[m][(freqs < lo) | (freqs > hi)] == 0)
    # neighbouring triangles overlap into a partition of unity between the first and last centre
    inside = (freqs >= pts[1]) & (freqs <= pts[80])
    np.testing.assert_allclose(fb[:, inside].sum(axis=0), 1.0, atol=1e-5)
    # Slaney normalisation: every triangle has unit area in Hz (checked where it spans >= 10 bins)
    fbn = D.mel_filterbank(norm=True)
    np.testing.assert_allclose(fbn, fb * (2.0 / (pts[2:] - pts[:-2]))[:, None], rtol=1e-5)
    wide = [m for m in range(80) if pts[m + 2] - pts[m] >= 400]
    assert len(wide) >= 10
    areas = fbn[wide].sum(axis=1) * (freqs[1] - freqs[0])
    np.testing.assert_allclose(areas, 1.0, rtol=0.02)


def _numpy_log_mel(x: np.ndarray) -> np.ndarray:
    """Textbook: centred frames (reflect padding), periodic Hann, |DFT|^2 by an explicit DFT
    matrix, mel projection, Whisper's log/clamp/scale."""
    n_fft, hop = 400, 160
    xp = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (len(xp) - n_fft) // hop
    frames = np.stack([xp[i * hop : i * hop + n_fft] for i in range(n_frames)])[:-1]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(n_fft)[None] / n_fft)
    power = np.abs((frames * window) @ dft.T) ** 2
    mel = power @ D.mel_filterbank().astype(np.float64).T
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def test_log_mel_matches_numpy_reference_and_finds_the_tone():
    t = np.arange(16000 * 2) / 16000
    rng = np.random.default_rng(0)
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    feats = D.log_mel(x)
    assert feats.shape == (200, 80)  # N // 160 frames
    np.testing.assert_allclose(feats, _numpy_log_mel(x), atol=2e-4)
    centers = D.mel_to_hz(np.linspace(0, D.hz_to_mel(8000.0), 82))[1:-1]
    peak = int(np.argmax(feats[100]))
    assert abs(centers[peak] - 1000.0) <= 60.0
    # WAV bytes -> same features; other rates are resampled to 16 kHz
    np.testing.assert_allclose(D.decode_audio(D.write_wav(x, 16000)), feats, atol=1e-2)  # 16-bit PCM
    t22 = np.arange(22050 * 2) / 22050
    x22 = (0.5 * np.sin(2 * np.pi * 440.0 * t22)).astype(np.float32)
    y = D.resample(x22, 22050, 16000)
    assert len(y) == 32000
    spec = np.abs(np.fft.rfft(y))
    assert np.fft.rfftfreq(len(y), 1 / 16000)[int(np.argmax(spec))] == pytest.approx(440.0, abs=0.5)


def test_wav_roundtrip_and_bad_media_raise():
    x = np.linspace(-0.9, 0.9, 1000).astype(np.float32)
    y, rate = D.read_wav(D.write_wav(x, 16000))
    assert rate == 16000 and np.abs(y - x).max() < 2.0 / 32767
    with pytest.raises(D.DecodeError):
        D.load_rgb(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(D.DecodeError):
        D.read_wav(b"RIFF....WAVEfmt garbage")


# ------------------------------------------------------------------ batch contract
def _runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    runs, start = [], None
    for t, v in enumerate(mask_row.tolist() + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            runs.append((start, t))
            start = None
    return runs


def test_batch_contract_shapes_and_invariants(demo):
    loader = _loader(demo)
    tok = loader.tokenizer
    delim = {
        m: (tok.special_id(o), tok.special_id(c))
        for m, o, c in ((1, "<I>", "</I>"), (2, "<A>", "</A>"), (3, "<V>", "</V>"))
    }
    seen = {1: 0, 2: 0, 3: 0}
    it = iter(loader)
    for _ in range(12):
        b = next(it)
        B, T = b["input_ids"].shape
        assert (B, T) == (4, 128)
        for k in ("labels", "loss_kind", "modality", "segment_ids", "position_ids"):
            assert b[k].shape == (B, T) and b[k].dtype == torch.long
        ni, nv, na = b["image"].shape[0], b["video"].shape[0], b["audio"].shape[0]
        assert b["image"].shape[1:] == (64, 192) and b["video"].shape[1:] == (64, 384)
        assert b["audio"].shape[2] == 80 and b["audio_frames"].shape == (na,)
        for kind, n in (("image", ni), ("video", nv), ("audio", na)):
            assert b[f"{kind}_caption_ids"].shape == (n, 32)
        # placeholders: R per media item, pad ids, wrapped in their delimiters
        for m, n in ((1, ni), (2, na), (3, nv)):
            seen[m] += n
            assert int((b["modality"] == m).sum()) == n * R
            for row in range(B):
                for s, e in _runs(b["modality"][row] == m):
                    assert e - s == R
                    assert b["input_ids"][row, s - 1] == delim[m][0] and b["input_ids"][row, e] == delim[m][1]
                    assert (b["input_ids"][row, s:e] == tok.pad_id).all()
        # labels: next token of the same segment where a loss applies, -100 elsewhere
        lab, ids, seg = b["labels"], b["input_ids"], b["segment_ids"]
        on = lab != IGNORE
        assert torch.equal(lab[:, :-1][on[:, :-1]], ids[:, 1:][on[:, :-1]])
        assert not on[:, -1].any()
        assert (seg[:, :-1][on[:, :-1]] == seg[:, 1:][on[:, :-1]]).all() and (seg[on] > 0).all()
        assert torch.equal(b["loss_kind"] > 0, on)
        assert not on[b["modality"] > 0].any()
        # segments: 1..k then padding; positions restart at 0 in every segment
        for row in range(B):
            s = seg[row]
            k = int(s.max())
            n_tok = int((s > 0).sum())
            assert torch.equal(s[:n_tok].unique_consecutive(), torch.arange(1, k + 1))
            assert (ids[row, n_tok:] == tok.pad_id).all()
            for j in range(1, k + 1):
                assert torch.equal(b["position_ids"][row][s == j], torch.arange(int((s == j).sum())))
        # audio: padded with zeros beyond each clip's frames
        for a, f in zip(b["audio"], b["audio_frames"]):
            assert 0 < f <= b["audio"].shape[1] and (a[f:] == 0).all()
        # vqa: the answer tokens sit at answer_start and are targets of kind 2
        for v in b["vqa"]:
            n = len(tok.encode(v["answer"]))
            r, s0 = v["row"], v["answer_start"]
            assert tok.decode(ids[r, s0 : s0 + n].tolist()) == v["answer"]
            assert (b["loss_kind"][r, s0 - 1 : s0 - 1 + n] == 2).all()
            assert tok.decode(ids[r, s0 - len(tok.encode(v["question"])) : s0].tolist()) == v["question"]
    assert all(seen.values()), seen  # images, audio and video all showed up


def test_first_batch_holds_the_first_samples_decoded(demo):
    """No shuffling, one shard: the media tensors are the decoded members in file order."""
    loader = _loader(demo, shards=demo["train"][:1], shuffle_buffer=0, loop=False)
    b = next(iter(loader))
    items = [it for it in iter_shard_samples(demo["train"][0])]
    pngs = [it["png"] for it in items if "png" in it][: b["image"].shape[0]]
    for got, png in zip(b["image"], pngs):
        np.testing.assert_array_equal(got.numpy(), D.patchify(D.load_rgb(png, 64), 8))
    tok = loader.tokenizer
    caps = [json.loads(it["json"]).get("caption") for it in items if "png" in it][: b["image"].shape[0]]
    for row, cap in zip(b["image_caption_ids"], caps):
        assert tok.decode([i for i in row.tolist() if i != tok.pad_id]) == (cap or "")


def test_eval_sets(demo):
    d = os.path.dirname(demo["tokenizer"])
    vqa, answers = load_vqa_eval(d)
    assert len(answers) == 13 and {"yes", "no", "circle"} <= set(answers)
    assert len(vqa) >= 12 and all(v["answer"] in answers for v in vqa)
    assert vqa[0]["image"].shape == (64, 192) and vqa[0]["key"].startswith("vqa-val-")
    caps = load_caption_eval(d)
    assert len([c for c in caps if c["key"].startswith("digit-val-")]) == 8
    assert any(c["caption"].startswith("a handwritten digit ") for c in caps)


# ------------------------------------------------------------------ split, resume, skipping
def _keys(loader) -> list[str]:
    return [key for key, _ in loader.iter_documents()]


@pytest.mark.parametrize("n_shards", [1, 5])
def test_rank_and_worker_splits_are_disjoint_and_cover(demo, n_shards):
    shards = demo["train"][:n_shards]
    every = [it["__key__"] for p in shards for it in iter_shard_samples(p)]
    parts = [_keys(_loader(demo, shards=shards, dp_rank=r, dp_size=2, num_workers=2, loop=False)) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(every)
    # what the DataLoader workers of rank 1 really pack is that rank's share
    got = sum(count_samples(b) for b in _loader(demo, shards=shards, dp_rank=1, dp_size=2, num_workers=2, loop=False))
    assert got == len(parts[1])


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_very_same_batches(demo, workers):
    ref = _loader(demo, num_workers=workers)
    it = iter(ref)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [next(it) for _ in range(6)]
    fresh = _loader(demo, num_workers=workers)
    fresh.load_state_dict(state)
    it2 = iter(fresh)
    for e in expected:
        _same(e, next(it2))
    with pytest.raises(ValueError, match="does not match"):
        _loader(demo, num_workers=workers, resampler_queries=4).load_state_dict(state)


def _corrupt_copies(demo, out) -> tuple[list[str], int]:
    """Copies of the train shards: shard 1 cut in the middle of a PNG member, shard 2 with
    one PNG replaced by garbage. Returns (paths, samples lost by the cut, beyond the error)."""
    os.makedirs(out, exist_ok=True)
    paths = [shutil.copy(p, out) for p in demo["train"][:4]]
    with tarfile.open(paths[1]) as tf:
        members = tf.getmembers()
    cut_at = next(i for i, m in enumerate(members) if m.name.endswith(".png") and i > 6)
    m = members[cut_at]
    with open(paths[1], "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)
    keys = list(dict.fromkeys(mm.name.split(".")[0] for mm in members))
    lost = len(keys) - keys.index(m.name.split(".")[0])
    items = [dict(it) for it in iter_shard_samples(paths[2])]
    bad = next(it for it in items if "png" in it)
    bad["png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    os.remove(paths[2])
    tmp = os.path.join(out, "rewrite")
    new = write_shards(({k: v for k, v in it.items() if k != "__url__"} for it in items), tmp, "x", 10**6)
    shutil.move(new[0], paths[2])
    return paths, lost


def test_truncated_shard_and_undecodable_image_are_skipped_and_counted(demo, tmp_path, caplog):
    paths, lost = _corrupt_copies(demo, str(tmp_path / "bad"))
    total = sum(1 for p in demo["train"][:4] for _ in iter_shard_samples(p))
    loader = _loader(demo, shards=paths, loop=False, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="aion_train.data.multimodal.loader"):
        got = sum(count_samples(b) for b in loader)
    assert loader.skipped == 2
    assert got == total - lost - 1
    msgs = [r.getMessage() for r in caplog.records]
    assert any("unreadable tar" in s and os.path.basename(paths[1]) in s for s in msgs)
    assert any("undecodable image" in s and os.path.basename(paths[2]) in s for s in msgs)
    # with 2 workers the count is the same (summed over the workers' states)
    loader2 = _loader(demo, shards=paths, loop=False, num_workers=2)
    assert sum(count_samples(b) for b in loader2) == got and loader2.skipped == 2


def test_training_completes_over_corrupt_data(demo, tmp_path):
    """The bar: `aion-train pretrain` of the multimodal config over the corrupt copies runs to
    its last step, and the skip count says 2 in the run's log and in MLflow."""
    pytest.importorskip("aion_train.model.multimodal")
    import json
    import sqlite3
    import subprocess
    import sys

    paths, _ = _corrupt_copies(demo, str(tmp_path / "bad"))
    repo = os.path.join(os.path.dirname(__file__), "..")
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "aion_train.cli",
        "pretrain",
        "--config",
        "configs/tiny_multimodal_cpu.yaml",
        f"run_dir={run}",
        f"data.train_shards={os.path.dirname(paths[0])}/*.tar",
        f"data.val_shards={demo['val'][0]}",
        f"data.tokenizer={demo['tokenizer']}",
        "model.n_layers=1",
        "data.micro_batch_size=2",
        "train.steps=12",
        "train.eval_every=12",
        "train.eval_batches=1",
        "train.save_every=12",
        "train.warmup_steps=2",
        "--json",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["final_step"] == 12 and summary["skipped_samples"] == 2
    assert "unreadable tar" in proc.stderr and "undecodable image" in proc.stderr
    db = sqlite3.connect(str(run / "mlflow.db"))
    (last,) = db.execute(
        "select value from metrics where key='data/skipped_samples' order by step desc limit 1"
    ).fetchone()
    assert last == 2.0


def test_bad_settings_are_refused(demo):
    with pytest.raises(ValueError, match="seq_len"):
        _loader(demo, seq_len=20)
    with pytest.raises(ValueError, match="patch_size"):
        _loader(demo, image_size=60)
    with pytest.raises(ValueError, match="unknown demo sizes"):
        mm_build.collect_samples(0, {"vqa": 3})
