"""Try a policy: a text (or the live model's answer to a prompt) raw and enforced, with every
span a rule matched in the raw text and the rule that fired."""

from __future__ import annotations

import asyncio
import threading

from aion_train.policy import PolicyError, enforce

from .api import MAX_TRY_TEXT, MAX_TRY_TOKENS, AdminError, issues_json, policy_from_body


def _char_spans(policy, raw: str) -> list[dict]:
    data = raw.encode("utf-8", "replace")
    out = []
    for rule in policy.rules:
        for s, e in rule.spans(data):
            out.append(
                {
                    "start": len(data[:s].decode("utf-8", "replace")),
                    "end": len(data[:e].decode("utf-8", "replace")),
                    "rule": rule.id,
                    "action": rule.action,
                    "category": rule.category,
                }
            )
    out.sort(key=lambda x: (x["start"], -x["end"]))
    return out


def _generate(service, prompt: str, max_tokens: int) -> str:
    """The live model's raw answer (the default policy: unrestricted), through the scheduler."""
    from aion_train.serve.sampling import SamplingParams
    from aion_train.serve.service import PromptSpec

    loaded = service.loaded
    if loaded.chat:
        ids = loaded.render_chat([{"role": "user", "content": prompt}])
        context = ids
    else:
        ids = context = loaded.encode_prompt(prompt)
    room = max(1, min(max_tokens, loaded.max_seq_len - len(ids)))
    if len(ids) >= loaded.max_seq_len:
        raise AdminError(400, "the prompt does not fit the model's context", "context_length_exceeded")
    params = SamplingParams(temperature=0.0, seed=0)
    rows, choices, _ = service.build(
        [PromptSpec(ids=ids, context=context, text=prompt)], 1, params, [room], service.policy.resolve(None)
    )
    done = threading.Event()
    job = service.submit(rows, on_done=done.set)
    done.wait(120)
    if job.error is not None:
        raise AdminError(500, f"generation failed: {type(job.error).__name__}", "generation_failed")
    return choices[0].result.text


async def run_try(site, body: dict) -> dict:
    j = body.get("jurisdiction")
    if not isinstance(j, str):
        raise AdminError(400, "try needs a jurisdiction", "missing_jurisdiction")
    if "policy" in body and body["policy"] is not None:
        try:
            doc = policy_from_body({"policy": body["policy"]}, f"{j}.json")
            issues = site.store.validate(doc, j)
            if issues:
                raise PolicyError(issues)
            policy_set = site.store.draft_policy_set(doc)
        except PolicyError as e:
            raise AdminError(422, "the draft policy is not valid", "invalid_policy", errors=issues_json(e)) from None
        source = "draft"
    else:
        policy_set = site._served()
        source = "served"
    policy = policy_set[j]
    if isinstance(body.get("prompt"), str):
        if site.service is None:
            raise AdminError(409, "no live model here: this admin runs without a server (try a text)", "no_model")
        mt = body.get("max_tokens", 32)
        if not isinstance(mt, int) or not 1 <= mt <= MAX_TRY_TOKENS:
            raise AdminError(400, f"max_tokens must be 1..{MAX_TRY_TOKENS}", "invalid_max_tokens")
        raw = await asyncio.to_thread(_generate, site.service, body["prompt"][:MAX_TRY_TEXT], mt)
    elif isinstance(body.get("text"), str):
        raw = body["text"]
        if len(raw) > MAX_TRY_TEXT:
            raise AdminError(413, f"text over {MAX_TRY_TEXT} characters", "text_too_long")
    else:
        raise AdminError(400, 'try needs "text" or "prompt"', "missing_text")
    res = enforce(raw, policy)
    return {
        "jurisdiction": j,
        "policy": source,
        "version": policy.version,
        "policy_sha256": policy.sha256,
        "raw": raw,
        "enforced": res.text,
        "blocked": res.blocked,
        "blocked_by": res.blocked_by,
        "redactions": res.redactions,
        "truncated": res.truncated,
        "flags": [{"rule": f.rule_id, "category": f.category, "matches": f.matches} for f in res.flags],
        "spans": _char_spans(policy, raw),
    }
