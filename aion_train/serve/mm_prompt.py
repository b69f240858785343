"""Chat messages with media parts -> the token layout the multimodal model was trained on.

Content parts as OpenAI sends them: `{"type": "text", "text"}`, `{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}`, `{"type": "input_audio", "input_audio":
{"data": "<base64 wav>", "format": "wav"}}`, and (an extension) `{"type": "video", "video":
["data:image/png;base64,...", ...]}`, the frames of one clip.

Layout (as `aion_train.data.multimodal.collate` renders samples): a user message is its media
blocks, in the order sent, `<I> pad*R </I>` / `<A> pad*R </A>` / `<V> pad*R </V>` (the
placeholders carry modality 1/2/3), then `<T>` and its text; the assistant's reply continues
that block and closes it with `</T>` (as a VQA answer follows its question); a system message
is a block `<T> text </T>` of its own. The prompt ends in the last user message's open block,
so the model answers there and ends with `</T>` (an end id of a multimodal model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .media import (
    MAX_MEDIA_PER_REQUEST,
    MediaError,
    MediaInput,
    b64decode,
    data_url_bytes,
    decode_frames,
    decode_image,
    decode_wav,
)

MEDIA_PARTS = ("image_url", "input_audio", "video")
_KIND_ID = {"image": 1, "audio": 2, "video": 3}
_DELIMS = {"image": ("<I>", "</I>"), "audio": ("<A>", "</A>"), "video": ("<V>", "</V>"), "text": ("<T>", "</T>")}


@dataclass
class MMPrompt:
    ids: list[int]
    modality: list[int]  # per token: 0 text, 1/2/3 a placeholder of image/audio/video
    media: list[MediaInput] = field(default_factory=list)  # in placeholder order


def _field(part: dict, name: str, param: str):
    v = part.get(name)
    if v is None:
        raise MediaError(f"{param}: a {part.get('type')!r} part needs the field {name!r}", param)
    return v


def decode_part(part: dict, mm, param: str) -> MediaInput:
    """One media content part -> its model input (MediaError: unusable)."""
    kind = part.get("type")
    if kind == "image_url":
        iu = _field(part, "image_url", param)
        url = iu.get("url") if isinstance(iu, dict) else iu
        return decode_image(data_url_bytes(url, f"{param}.image_url.url"), mm, f"{param}.image_url")
    if kind == "input_audio":
        ia = _field(part, "input_audio", param)
        if not isinstance(ia, dict) or not isinstance(ia.get("data"), str):
            raise MediaError(f"{param}.input_audio: needs {{'data': base64 WAV, 'format': 'wav'}}", param)
        if ia.get("format", "wav") != "wav":
            raise MediaError(f"{param}.input_audio.format: only 'wav' is supported, got {ia.get('format')!r}", param)
        return decode_wav(b64decode(ia["data"], f"{param}.input_audio.data"), mm, f"{param}.input_audio")
    if kind == "video":
        frames = _field(part, "video", param)
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise MediaError(f"{param}.video: a list of image data URLs (the frames)", param)
        raw = [data_url_bytes(f, f"{param}.video.{i}") for i, f in enumerate(frames)]
        return decode_frames(raw, mm, f"{param}.video")
    raise MediaError(f"{param}: content parts of type {kind!r} are not supported", param)


def parse_messages(messages: list[dict], mm) -> list[dict]:
    """[{role, content}] (content a string or parts) -> [{role, text, media: [MediaInput]}].
    `mm` None (a text-only model): any media part is refused (code media_unsupported)."""
    out, n_media = [], 0
    for i, m in enumerate(messages):
        content = m.get("content")
        texts, media = [], []
        if isinstance(content, list):
            for k, part in enumerate(content):
                param = f"messages.{i}.content.{k}"
                if not isinstance(part, dict):
                    raise MediaError(f"{param}: a content part must be an object", param)
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                    continue
                if part.get("type") in MEDIA_PARTS:
                    if mm is None:
                        raise MediaError(
                            f"{param}: a {part['type']!r} part was sent to a text-only model; "
                            "media need a multimodal checkpoint",
                            param,
                            "media_unsupported",
                        )
                    n_media += 1
                    if n_media > MAX_MEDIA_PER_REQUEST:
                        raise MediaError(
                            f"too many media parts: at most {MAX_MEDIA_PER_REQUEST} per request",
                            param,
                            "too_many_media",
                        )
                    if m.get("role") != "user":
                        raise MediaError(f"{param}: media parts go in user messages", param)
                media.append(decode_part(part, mm, param))
        elif content is not None:
            texts.append(str(content))
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "text": "".join(texts), "media": media})
    return out


def render(tok, mm, messages: list[dict]) -> MMPrompt:
    """Parsed messages -> ids, modality and media of the prompt (layout: module doc)."""
    sid = tok.special_id
    t_open, t_close = sid("<T>"), sid("</T>")
    p = MMPrompt([], [])
    open_block = False

    def add(ids, kind_id=0):
        p.ids.extend(ids)
        p.modality.extend([kind_id] * len(ids))

    for m in messages:
        if m["role"] == "assistant":
            if not open_block:
                add([t_open])
            add(tok.encode(m["text"]) + [t_close])
            open_block = False
            continue
        if open_block:
            add([t_close])
        for item in m["media"]:
            o, c = _DELIMS[item.kind]
            add([sid(o)])
            add([mm.pad_id] * mm.resampler_queries, _KIND_ID[item.kind])
            add([sid(c)])
            p.media.append(item)
        add([t_open] + (tok.encode(m["text"]) if m["text"] else []))
        open_block = True
        if m["role"] == "system":
            add([t_close])
            open_block = False
    if not open_block:
        add([t_open])
    return p


def end_ids(tok) -> tuple[int, ...]:
    """What ends a multimodal model's answer: `</T>` (and the tokenizer's end of sequence)."""
    return (int(tok.special_id("</T>")), int(tok.eos_id))
