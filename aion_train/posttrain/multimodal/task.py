"""The checkable multimodal post-training task: the prompt holds the image, the sound or the clip.

Three kinds of question, every one rendered by the serving layer's chat layout
(`aion_train.serve.mm_prompt.render`, the layout multimodal pretraining packs), so a prompt
here is byte for byte what `aion-train serve` builds from OpenAI content parts:

    image   <I> pad*R </I> <T> is there a red shape?                    (easy-vqa PNG)
    spoken  <I> pad*R </I> <A> pad*R </A> <T>                           (the question as
            espeak-ng speech, 16 kHz WAV: the answer is checked as text)
    video   <V> pad*R </V> <T> which way does the shape move?           (an easy-vqa image
            translated 3 px per frame over 8 frames: left / right / up / down)

No prompt carries a textual description of the media: what the model knows about the image
it gets from the pixels. Answers are one word from a closed set followed by `</T>` (the end of
a multimodal answer). SFT and reward-model prompts come from most of the easy-vqa *train*
images, PPO's from the rest (images SFT never saw), held-out ones from the *test* images. Speech is synthesised
once per text into {run_dir}/task/speech/ (deterministic, shared by the phases)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aion_train.config.posttrain_schema import MM_KINDS
from aion_train.fsutil import atomic_write

KINDS = MM_KINDS
MODALITIES = {"image": ("image",), "spoken": ("image", "audio"), "video": ("video",)}
DIRECTIONS = ("down", "left", "right", "up")
VIDEO_QUESTION = "which way does the shape move?"


@dataclass
class MMExample:
    messages: list  # parsed user turn: [{"role": "user", "text", "media": [MediaInput]}]
    prompt: object  # serve.mm_prompt.MMPrompt: ids, modality, media
    answer: str
    candidates: tuple
    kind: str  # image | spoken | video
    question: str  # what was asked (written or spoken)
    columns: dict = field(default_factory=dict)  # for reward functions (they get `answer`)

    @property
    def prompt_ids(self) -> list:
        return self.prompt.ids


class AnswerTokenizer:
    """The multimodal tokenizer as the answer-level helpers of text post-training read it
    (`reward.response_pairs`, `malformed_response`): encode, end_id = </T>, sp.vocab_size."""

    def __init__(self, tok, end_id: int):
        self.tok, self.end_id, self.vocab_size = tok, end_id, tok.vocab_size
        self.sp = self

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)


@dataclass
class MMTask:
    tokenizer: object  # aion_train.data.Tokenizer of the multimodal base (special_id, encode)
    mm: object  # cfg.model.multimodal
    splits: dict  # "train" / "test" -> list[MMExample]
    end_id: int  # </T>
    pad_id: int

    def prompts(self, split: str) -> list:
        if split not in self.splits:
            raise KeyError(f"multimodal task split {split!r}: have {sorted(self.splits)}")
        return self.splits[split]

    @property
    def answer_tokenizer(self) -> AnswerTokenizer:
        return AnswerTokenizer(self.tokenizer, self.end_id)

    def answer_ids(self, text: str) -> list[int]:
        """The tokens of an answer as the model should produce it: text + </T>."""
        return self.tokenizer.encode(text) + [self.end_id]

    def decode(self, ids) -> str:
        """Text of generated ids; </T> and ids past the tokenizer (a model vocabulary padded
        beyond it) are not text."""
        n = self.tokenizer.vocab_size
        return self.tokenizer.decode([int(i) for i in ids if int(i) != self.end_id and int(i) < n])


def _answers():
    from aion_train.data.multimodal.sources import easy_vqa_answers

    return tuple(easy_vqa_answers())


def _candidates(answer: str, answers: tuple) -> tuple:
    from aion_train.posttrain.task import kind_of

    return kind_of(answer)[1] if answer in answers else answers


def _speech(text: str, folder: Path) -> bytes:
    from aion_train.data.multimodal.sources import speak

    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.wav"
    if path.is_file():
        return path.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    wav = speak(text, str(folder))
    with atomic_write(path, "wb") as f:
        f.write(wav)
    return wav


def _user(tok, mm, text: str, media: list):
    from aion_train.serve.mm_prompt import render

    messages = [{"role": "user", "text": text, "media": media}]
    return messages, render(tok, mm, messages)


def build_examples(records: list[dict], tok, mm, kind: str, n: int, rng: random.Random, speech_dir: Path) -> list:
    """`n` examples of one kind from easy-vqa image records (seeded picks)."""
    from aion_train.data.multimodal.decode import decode_video
    from aion_train.data.multimodal.sources import moving_strip
    from aion_train.serve.media import MediaInput, decode_image, decode_wav

    answers = _answers()
    usable = [r for r in records if r["color"] and r["shape"]] if kind == "video" else records
    out = []
    for _ in range(n):
        rec = usable[rng.randrange(len(usable))]
        png = Path(rec["path"]).read_bytes()
        if kind == "video":
            direction = DIRECTIONS[rng.randrange(len(DIRECTIONS))]
            strip = moving_strip(rec["path"], direction, mm.video_frames)  # the pretraining clips
            tubes = decode_video(strip, mm.video_frames, mm.image_size, mm.tubelet_frames, mm.patch_size)
            sha = hashlib.sha256(strip).hexdigest()
            media = [MediaInput("video", sha, torch.from_numpy(tubes))]
            messages, prompt = _user(tok, mm, VIDEO_QUESTION, media)
            out.append(MMExample(messages, prompt, direction, DIRECTIONS, kind, VIDEO_QUESTION))
            continue
        q, a = rec["qa"][rng.randrange(len(rec["qa"]))]
        media = [decode_image(png, mm)]
        if kind == "spoken":
            media.append(decode_wav(_speech(q, speech_dir), mm))
            messages, prompt = _user(tok, mm, "", media)
        else:
            messages, prompt = _user(tok, mm, q, media)
        out.append(MMExample(messages, prompt, a, _candidates(a, answers), kind, q))
    return out


def task_tokenizer(cfg):
    """The multimodal base's tokenizer: data.tokenizer, else the demo set's in data.dir."""
    from aion_train.eval.loading import multimodal_data

    return multimodal_data(cfg)[1]


def split_images(records: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """(SFT / reward-model images, PPO images): a seeded `fraction` of the images kept apart."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = int(round(fraction * len(records)))
    ppo = set(order[:cut])
    return [r for i, r in enumerate(records) if i not in ppo], [r for i, r in enumerate(records) if i in ppo]


def build_mm_task(cfg) -> MMTask:
    """Splits of every kind in `sft.mm_kinds` (cached per process: the phases of one process
    share it): "sft" (SFT and reward-model prompts), "train" (PPO's prompts, on easy-vqa train
    images kept out of "sft": `sft.mm_ppo_fraction` of them), "test" (easy-vqa test images)."""
    from aion_train.data.multimodal.sources import easy_vqa_records

    s = cfg.sft
    key = (
        cfg.seed,
        tuple(s.mm_kinds),
        s.mm_train_per_kind,
        s.mm_eval_per_kind,
        s.mm_ppo_fraction,
        s.mm_ppo_per_kind,
        cfg.data.dir,
        cfg.data.tokenizer,
    )
    if key in _CACHE:
        return _CACHE[key]
    tok, mm = task_tokenizer(cfg), cfg.model.multimodal
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the multimodal tokenizer {tok.path} has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}"
        )
    speech_dir = Path(cfg.run_dir) / "task" / "speech"
    sft_images, ppo_images = split_images(easy_vqa_records("train"), s.mm_ppo_fraction, cfg.seed + 5)
    parts = (
        ("sft", sft_images, s.mm_train_per_kind, 0),
        ("train", ppo_images, s.mm_ppo_per_kind, 2),
        ("test", easy_vqa_records("test"), s.mm_eval_per_kind, 1),
    )
    splits = {}
    for split, records, n, salt in parts:
        examples = []
        for k, kind in enumerate(s.mm_kinds):
            rng = random.Random((cfg.seed * 31 + salt) * 8 + k)
            examples += build_examples(records, tok, mm, kind, n, rng, speech_dir)
        splits[split] = examples
    _CACHE.clear()
    _CACHE[key] = MMTask(tok, mm, splits, int(tok.special_id("</T>")), int(mm.pad_id))
    return _CACHE[key]


_CACHE: dict = {}


def is_correct(example: MMExample, text: str) -> bool:
    from aion_train.posttrain.task import normalise_answer

    return normalise_answer(text) == normalise_answer(example.answer)


def modalities_of(kinds) -> list[str]:
    """The input modalities the task's prompts carry (text always: every prompt has a text block)."""
    seen = {"text"}
    for k in kinds:
        seen.update(MODALITIES[k])
    return sorted(seen)


__all__ = ["DIRECTIONS", "KINDS", "MMExample", "MMTask", "build_mm_task", "is_correct", "modalities_of"]
