"""bench data: can the multimodal loader keep a training step fed?

Three rates in samples per second on the same training shards of the multimodal demo
(``data.dir`` of ``configs/tiny_multimodal_cpu.yaml``, built if absent):

* ``loader_samples_per_s``: :class:`MultimodalLoader` with 2 DataLoader workers (read,
  decode PNG / WAV->log-mel / film strip->tubelets, tokenise, pack, collate), in steady state
  (the first batch, which pays for starting the workers, is not timed);
* ``raw_read_samples_per_s``: the same tars read sample by sample in this process, no decoding;
* ``train_samples_per_s``: what a training step consumes: forward + backward + AdamW of the
  config's model on real loader batches (fp32, this process's threads), samples per second.
  The model is ``build_multimodal_model`` when ``aion_train.model.multimodal`` provides it
  (``train_model: "multimodal"``); otherwise a clearly labelled stand-in, the config's text
  transformer on the same batches' token ids (``train_model: "stand-in: text transformer"``).

``headroom = loader / train``: how many times faster the loader produces samples than the
step consumes them (the bar is >= 3). Samples are counted as packed segments of a batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

DEFAULT_CONFIG = "configs/tiny_multimodal_cpu.yaml"
QUICK = {"batches": 4, "train_steps": 2}


def _config(config: str | None):
    from aion_train.config import load_config

    path = Path(config or DEFAULT_CONFIG)
    if not path.is_file() and not config:
        path = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
    return load_config(str(path), ["train.precision=fp32"])


def _loader(cfg, shards, tokenizer, num_workers: int, seed: int):
    from aion_train.data.multimodal import MultimodalLoader

    return MultimodalLoader.from_config(cfg, shards, tokenizer, num_workers=num_workers, seed=seed)


def measure_loader(cfg, shards, tokenizer, batches: int, num_workers: int = 2) -> tuple[float, int]:
    """(samples/s in steady state, samples per batch) of the loader with ``num_workers``."""
    from aion_train.data.multimodal import count_samples

    it = iter(_loader(cfg, shards, tokenizer, num_workers, cfg.seed))
    next(it)  # worker start-up
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += count_samples(next(it))
    dt = time.perf_counter() - t0
    del it
    return n / dt, n // batches


def measure_raw_read(shards, samples: int) -> float:
    """Samples/s reading the tars (WebDataset iteration, members as bytes), no decoding."""
    from aion_train.data.shards import iter_shard_samples

    n, t0 = 0, time.perf_counter()
    while n < samples:
        for path in shards:
            for item in iter_shard_samples(path):
                n += isinstance(item, dict)
                if n >= samples:
                    break
            if n >= samples:
                break
    return n / (time.perf_counter() - t0)


def _train_model(cfg):
    """(model, step_fn(batch) -> loss, label)."""
    try:
        from aion_train.model.multimodal import build_multimodal_model
    except ImportError:
        build_multimodal_model = None
    if build_multimodal_model is not None and cfg.model.multimodal.enabled:
        model = build_multimodal_model(cfg, seed=cfg.data.demo_seed)
        return model, lambda b: model(b).loss, "multimodal"
    from aion_train.model.transformer import build_model

    model = build_model(cfg.model, cfg.seed)
    return model, lambda b: model(b["input_ids"], labels=b["labels"]).loss, "stand-in: text transformer"


def measure_train(cfg, shards, tokenizer, steps: int, warmup: int = 1) -> tuple[float, str]:
    """(samples/s a training step consumes, which model) on real batches of the loader."""
    from aion_train.data.multimodal import count_samples

    it = iter(_loader(cfg, shards, tokenizer, 0, cfg.seed + 1))
    batches = [next(it) for _ in range(warmup + steps)]
    model, loss_of, label = _train_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, foreach=True)

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss_of(b).backward()
        opt.step()

    for b in batches[:warmup]:
        step(b)
    n, t0 = 0, time.perf_counter()
    for b in batches[warmup:]:
        step(b)
        n += count_samples(b)
    return n / (time.perf_counter() - t0), label


def run_bench(
    config: str | None = None,
    batches: int = 40,
    train_steps: int = 8,
    data_dir: str | None = None,
    num_workers: int = 2,
    **_ignored,
) -> dict:
    """The JSON fields of ``aion-train bench data`` (see the module doc). ``data_dir``: use
    the multimodal set already built there instead of the config's demo."""
    from aion_train.data.multimodal.build import ensure_multimodal_demo, multimodal_demo_paths
    from aion_train.data.tokenizer import Tokenizer

    cfg = _config(config)
    if data_dir:  # an already built set (e.g. a small one in tests)
        paths = multimodal_demo_paths(data_dir)
    else:
        paths = ensure_multimodal_demo(cfg.data.dir, cfg.model.vocab_size, seed=cfg.data.demo_seed)
    tok = Tokenizer(paths["tokenizer"])
    shards = paths["train"]
    loader_sps, per_batch = measure_loader(cfg, shards, tok, batches, num_workers)
    raw_sps = measure_raw_read(shards, max(1000, batches * per_batch))
    train_sps, label = measure_train(cfg, shards, tok, train_steps)
    loader_sps, train_sps = round(loader_sps, 1), round(train_sps, 1)  # headroom: of the reported rates
    return {
        "loader_samples_per_s": loader_sps,
        "raw_read_samples_per_s": round(raw_sps, 1),
        "train_samples_per_s": train_sps,
        "headroom": round(loader_sps / train_sps, 2),
        "loader_workers": num_workers,
        "samples_per_batch": per_batch,
        "batch": [cfg.data.micro_batch_size, cfg.data.seq_len],
        "train_model": label,
        "torch_threads": torch.get_num_threads(),
    }
