"""A loaded model + policies + the engine: requests in, choices out. The HTTP API
(openai_api.py) and `aion-train generate` both go through `Service.build`, so the same
request gives the same tokens and text through either (same seed, same rows, same code).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aion_train.model.execution import ExecutionPolicy
from aion_train.policy import PolicyError, PolicySet

from .choice import ChoiceResult, ChoiceState
from .engine import Engine, Row
from .engine_process import EngineProcess
from .loading import LoadedModel
from .policy_runtime import PolicyRuntime, RequestPolicy
from .sampling import SamplingParams, choice_generator, new_seed
from .scheduler import Job, Scheduler

MAX_ROWS_PER_REQUEST = 64
log = logging.getLogger(__name__)


class ContextError(ValueError):
    """The prompt (with max_tokens) does not fit the model's context."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class PromptSpec:
    ids: list[int]
    context: list[int]  # ids before the generated text, for detokenizing
    text: str = ""  # the prompt as text (echo)
    modality: list[int] | None = None  # a multimodal prompt: per token 0 or the placeholder's kind id
    media: list | None = None  # its media (serve.media.MediaInput), in placeholder order


def plan_max_tokens(
    prompt_len: int,
    requested: int | None,
    default: int | None,
    context: int,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
) -> int:
    """The number of tokens to generate, or ContextError (OpenAI's context_length_exceeded)."""
    if prompt_len > context or (prompt_len == context and requested != 0):
        raise ContextError(
            f"This model's maximum context length is {context} tokens. However, "
            f"your prompt is {prompt_len} tokens long, which leaves no room for a "
            "completion.",
            prompt_param,
        )
    room = context - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if prompt_len + requested > context:
        raise ContextError(
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} in the completion). Please reduce the prompt or max_tokens.",
            param,
        )
    return requested


@dataclass(frozen=True)
class ReloadEvent:
    """One policy reload attempt, as the reload listeners (metrics, logs) hear of it."""

    path: str | None
    previous_sha256: str
    bundle_sha256: str | None = None  # the set now served (None: refused)
    error: PolicyError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def changed(self) -> bool:
        return self.ok and self.bundle_sha256 != self.previous_sha256


ENGINE_MODES = ("process", "thread")


class Service:
    def __init__(
        self,
        loaded: LoadedModel,
        policies: PolicySet | None = None,
        max_batch: int = 8,
        threads: int | None = None,
        engine: str | None = None,
    ):
        """`engine`: where the engine runs, `process` (engine_process.py) or `thread` (a worker
        thread of this process); default: the execution policy's choice for the model's device
        (`serving_process`: a process on the CPU)."""
        if engine is not None and engine not in ENGINE_MODES:
            raise ValueError(f"engine={engine!r}: must be one of {', '.join(ENGINE_MODES)}")
        self.loaded = loaded
        self.policy = PolicyRuntime(policies if policies is not None else PolicySet.default_only())
        device = next(loaded.model.parameters()).device
        execution = ExecutionPolicy.for_device(device.type).for_generation()
        self.engine_mode = engine or ("process" if execution.serving_process else "thread")
        if self.engine_mode == "process":
            self.engine = None  # it lives in the child
            self.scheduler = EngineProcess(
                loaded.model, loaded.eos_ids, loaded.vocab_size, execution, max_batch, threads
            )
        else:
            self.engine = Engine(loaded.model, loaded.eos_ids, loaded.vocab_size, execution)
            self.scheduler = Scheduler(self.engine, max_batch, threads)
        self.reload_listeners: list[Callable[[ReloadEvent], None]] = []
        self.policy_watcher = None  # a policy_reload.PolicyWatcher, started with the service
        self._reload_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._open_jobs = 0

    def engine_down(self) -> str | None:
        """Why the engine cannot take requests (None: it can). A started engine process that
        has exited says how; a scheduler that was never started, or stopped, says so."""
        return self.scheduler.down_reason()

    def add_media_listener(self, fn: Callable[[str, bool], None]) -> None:
        """fn(kind, hit) at every lookup of the engine's media cache (a multimodal model)."""
        if self.engine is None:
            self.scheduler.media_listeners.append(fn)
        elif self.engine.media_cache is not None:
            self.engine.media_cache.listeners.append(fn)

    def media_stats(self) -> dict[str, int]:
        """The engine's media cache: items encoded (misses) and hits."""
        if self.engine is None:
            return dict(self.scheduler.media_stats)
        cache = self.engine.media_cache
        return {"encodes": cache.encodes, "hits": cache.hits} if cache is not None else {"encodes": 0, "hits": 0}

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def policies(self) -> PolicySet:
        """The policy set served now (swapped as a whole by `reload_policies`)."""
        return self.policy.policy_set

    def start(self) -> Service:
        self.scheduler.start()
        if self.policy_watcher is not None:
            self.policy_watcher.start()
        return self

    def stop(self) -> None:
        if self.policy_watcher is not None:
            self.policy_watcher.stop()
        self.scheduler.stop()

    def reload_policies(self, bundle_path: str | os.PathLike | None = None) -> PolicySet:
        """Load, validate and compile the bundle at `bundle_path` (default: the file the served
        set came from), then serve it: one assignment swaps the whole set, so a request
        resolves its policy from the old set or the new one, never a mix, and a request
        already running keeps the RequestPolicy it started with. A broken bundle raises
        PolicyError (naming the file, the JSON path and the problem) and the served set stays.
        Every attempt is passed to `reload_listeners`."""
        with self._reload_lock:
            old = self.policies
            path = bundle_path if bundle_path is not None else old.path
            try:
                if path is None:
                    raise PolicyError("no policy bundle to reload: the server was started without one (--policy)")
                new = PolicySet.load(path)
            except PolicyError as e:
                self._tell(ReloadEvent(str(path) if path else None, old.bundle_sha256, error=e))
                raise
            self.policy.policy_set = new
            self._tell(ReloadEvent(str(new.path), old.bundle_sha256, new.bundle_sha256))
            return new

    def _tell(self, event: ReloadEvent) -> None:
        for listener in list(self.reload_listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener must not undo a validated swap
                log.exception("policy reload listener failed")

    def build(
        self,
        prompts: Sequence[PromptSpec],
        n: int,
        params: SamplingParams,
        max_new: Sequence[int],
        policy: RequestPolicy,
        *,
        on_delta: Callable[[int, str], None] | None = None,
        on_choice: Callable[[ChoiceResult], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[list[Row], list[ChoiceState], int]:
        """(rows, choices, seed): choice i = prompt i // n, sample i % n, its random stream
        seeded from (seed, i); the seed is the request's or a fresh random one."""
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise ValueError(
                f"{len(prompts)} prompts x n={n} choices is over the limit of {MAX_ROWS_PER_REQUEST} per request"
            )
        seed = params.seed if params.seed is not None else new_seed()
        rows, choices = [], []
        for p_i, prompt in enumerate(prompts):
            for j in range(n):
                idx = p_i * n + j
                c = ChoiceState(
                    idx, self.tokenizer, prompt.context, params.stop, policy, on_delta=on_delta, cancelled=cancelled
                )

                def finished(row, c=c):
                    res = c.finish(row.finish_reason)
                    if on_choice is not None:
                        on_choice(res)

                rows.append(
                    Row(
                        prompt_ids=list(prompt.ids),
                        params=params,
                        max_new=int(max_new[p_i]),
                        generator=None if params.greedy else choice_generator(seed, idx),
                        sink=c.push,
                        on_finish=finished,
                        prompt_logprobs=bool(params.echo and params.logprobs is not None),
                        modality=prompt.modality,
                        media=prompt.media,
                    )
                )
                choices.append(c)
        return rows, choices, seed

    def generate(
        self,
        prompts: Sequence[PromptSpec],
        n: int,
        params: SamplingParams,
        max_new: Sequence[int],
        policy: RequestPolicy,
        on_delta=None,
    ):
        """Run in the calling thread (no scheduler): (rows, results, seed)."""
        rows, choices, seed = self.build(prompts, n, params, max_new, policy, on_delta=on_delta)
        self.scheduler.run_now(rows)
        return rows, [c.result for c in choices], seed

    @property
    def open_jobs(self) -> int:
        """Jobs submitted and not finished yet (queued or running): 0 when the server is idle."""
        return self._open_jobs

    def submit(self, rows: list[Row], on_error=None, on_done=None) -> Job:
        def done():
            with self._jobs_lock:
                self._open_jobs -= 1
            if on_done is not None:
                on_done()

        with self._jobs_lock:
            self._open_jobs += 1
        try:
            return self.scheduler.submit(Job(rows=rows, on_error=on_error, on_done=done))
        except BaseException:
            with self._jobs_lock:
                self._open_jobs -= 1
            raise


def aion_object(request_id: str, policy: RequestPolicy, results: Sequence[ChoiceResult], seed: int) -> dict:
    """The `aion` extension of every response."""
    flags: dict[str, dict] = {}
    for r in results:
        for f in r.enforcement.flags:
            e = flags.setdefault(f.rule_id, {"rule": f.rule_id, "category": f.category, "matches": 0})
            e["matches"] += f.matches
    return {
        "request_id": request_id,
        **policy.describe(),
        "blocked": any(r.enforcement.blocked for r in results),
        "flags": list(flags.values()),
        "redactions": sum(r.enforcement.redactions for r in results),
        "seed": seed,
        "choices": [r.aion() for r in sorted(results, key=lambda r: r.index)],
    }


def merged_actions(results: Sequence[ChoiceResult]) -> dict:
    out: dict[str, dict] = {}
    for r in results:
        for rule, a in r.actions.items():
            e = out.setdefault(rule, {"action": a["action"], "matches": 0})
            e["matches"] += a.get("matches", 1)
    return out


def token_str(tokenizer, token_id: int) -> str:
    """A token's display string (the tokenizer's `piece_text`; the chat role tokens by name)."""
    sp = getattr(tokenizer, "sp", tokenizer)
    if token_id >= sp.vocab_size:
        from aion_train.posttrain.chat_template import ROLE_TOKENS

        k = token_id - sp.vocab_size
        return ROLE_TOKENS[k] if k < len(ROLE_TOKENS) else f"<id {token_id}>"
    return sp.piece_text(int(token_id))
