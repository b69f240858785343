"""A GPU path that runs, checked on the CPU: rank -> GPU mapping, the local backend choice,
collectives on the process group's device, and batches moved to the model's / engine's device.

No GPU here, so "another device" is the meta device standing in for the GPU: a model or engine
that says it computes on meta records the devices of what it is handed, and the collectives
see the device `comm_device` names (patched to meta: what NCCL's cuda device is to a CPU
tensor). Code that forgets to move a batch, or reduces a CPU tensor directly, hands these
fakes CPU tensors and the tests fail. Meta tensors hold no data, so a fake stops the run
(`Stop`) at the first call it checks."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from aion_train.parallel import device as devmod
from aion_train.parallel.collectives import all_reduce_
from aion_train.parallel.device import (
    backend_device,
    comm_device,
    cuda_index,
    get_device,
    local_rank_from_env,
    module_device,
    to_device,
)
from aion_train.parallel.groups import ParallelGroups
from aion_train.parallel.spawn import init_distributed, local_backend, rank_env, run_ranks

REPO = Path(__file__).resolve().parents[1]
META = torch.device("meta")


class Stop(Exception):
    """Raised by a fake once it has recorded what it was handed."""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class OnMeta(nn.Module):
    """A model / engine that computes on the meta device (module_device reads `.device`): it
    records the devices of every tensor it is called with, then stops the run, unless
    `result` gives what to return."""

    def __init__(self, result=None):
        super().__init__()
        self.device = META
        self.blocks = nn.ModuleList()  # what generate() sizes its KV cache by
        self.seen: list[set] = []
        self.result = result

    def forward(self, *args, **kw):
        self.seen.append({t.device for t in _tensors((args, kw))})
        if self.result is None:
            raise Stop
        return self.result(*args, **kw)


@pytest.fixture
def fake_nccl(monkeypatch):
    """A 2-rank process group whose communication device is meta; every dist.all_reduce
    records the device of its tensor and stops."""
    seen = []

    def all_reduce(t, op=None, group=None, async_op=False):
        seen.append(t.device)
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(devmod, "comm_device", lambda group=None: META)
    return seen


# ------------------------------------------------------------------ LOCAL_RANK -> GPU
def test_cuda_index_follows_local_rank_and_never_doubles_up():
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert cuda_index(5, 1) == 0  # one GPU bound per process (srun --gpus-per-task)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=5 but this process sees only 4 GPUs"):
        cuda_index(5, 4)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_index(0, 0)


def test_local_rank_comes_from_the_launchers_variables():
    assert local_rank_from_env({}) == 0
    assert local_rank_from_env({"LOCAL_RANK": "3", "SLURM_LOCALID": "1"}) == 3
    assert local_rank_from_env({"SLURM_LOCALID": "2"}) == 2  # plain srun
    assert local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == 1


@pytest.fixture
def four_gpus(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    return current


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_get_device_picks_the_gpu_of_local_rank(four_gpus, monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    d = get_device()
    assert d.torch_device == torch.device("cuda", local_rank) and d.is_cuda
    assert four_gpus == [local_rank]
    assert d.dist_backend() == "nccl"
    assert get_device(prefer="cpu").torch_device == torch.device("cpu")


def test_get_device_refuses_a_rank_without_its_own_gpu(four_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "6")
    with pytest.raises(RuntimeError, match="NCCL refuses"):
        get_device()
    assert four_gpus == []


def test_init_distributed_on_gloo_stays_on_the_cpu(four_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert init_distributed("gloo")[2].torch_device == torch.device("cpu")
    assert init_distributed("auto")[2].torch_device == torch.device("cuda", 2)


def test_local_backend_never_puts_two_nccl_ranks_on_one_gpu(caplog):
    assert local_backend(2, "auto", n_gpus=0) == "gloo"
    assert local_backend(2, "auto", n_gpus=2) == "nccl"
    assert local_backend(2, "auto", n_gpus=8) == "nccl"
    assert local_backend(4, "gloo", n_gpus=8) == "gloo"
    with caplog.at_level(logging.WARNING, logger="aion_train.parallel"):
        assert local_backend(4, "auto", n_gpus=2) == "gloo"
    assert "4 local ranks but 2 GPUs" in caplog.text
    with pytest.raises(RuntimeError, match="4 local ranks on NCCL need 4 GPUs, but this host has 2"):
        local_backend(4, "nccl", n_gpus=2)
    with pytest.raises(ValueError):
        local_backend(2, "mpi", n_gpus=0)


def test_gloo_ranks_on_a_gpu_host_see_no_gpu():
    env = rank_env(3, 4, 12345, "gloo", host_gpus=2)
    assert env["LOCAL_RANK"] == "3" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in rank_env(1, 2, 12345, "nccl", host_gpus=2)
    assert "CUDA_VISIBLE_DEVICES" not in rank_env(1, 2, 12345, "gloo", host_gpus=0)


def test_run_ranks_refuses_nccl_without_gpus_before_spawning():
    if torch.cuda.is_available():
        pytest.skip("this host has GPUs")
    with pytest.raises(RuntimeError, match="need 2 GPUs, but this host has 0"):
        run_ranks(print, 2, backend="nccl")


# ------------------------------------------------------------------ the communication device
def test_comm_device_is_the_backends(monkeypatch):
    assert comm_device() == torch.device("cpu")  # no process group
    assert backend_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert backend_device("nccl") == torch.device("cuda", 3)
    assert backend_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm_device(object()) == torch.device("cpu")


def test_all_reduce_moves_to_the_comm_device(fake_nccl):
    with pytest.raises(Stop):
        all_reduce_(torch.ones(3))
    assert fake_nccl == [META]


def test_all_reduce_reduces_in_place_on_the_comm_device(monkeypatch):
    """On the group's device the tensor itself is reduced (gloo: exactly the direct call)."""
    handed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: (handed.append(t), t.mul_(2)))
    t = torch.ones(2)
    assert all_reduce_(t) is t and handed[0] is t and t.tolist() == [2.0, 2.0]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert all_reduce_(t).tolist() == [2.0, 2.0] and len(handed) == 1


def test_module_device_and_to_device():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.Linear(2, 2).to("meta")) == META
    assert module_device(OnMeta()) == META
    assert module_device(nn.Module()) == torch.device("cpu")
    batch = {"ids": torch.ones(2), "pair": (torch.ones(1), 3), "vqa": [{"answer": "yes", "row": 0}]}
    moved = to_device(batch, META)
    assert moved["ids"].device == META and moved["pair"][0].device == META and moved["pair"][1] == 3
    assert moved["vqa"] == [{"answer": "yes", "row": 0}]


# ------------------------------------------------------------------ every collective in our code
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_to_all_single",
    "all_to_all",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
}
# raw collectives on tensors that live on the model's device by construction (activations,
# gradients, parameters, routing counts), next to the helper itself
ON_MODEL_TENSORS = {
    ("aion_train/parallel/collectives.py", "all_reduce_"),
    ("aion_train/parallel/collectives.py", "_all_reduce"),
    ("aion_train/parallel/collectives.py", "_all_gather"),
    ("aion_train/parallel/collectives.py", "_reduce_scatter"),
    ("aion_train/parallel/collectives.py", "_AllToAll.forward"),
    ("aion_train/parallel/collectives.py", "_AllToAll.backward"),
    ("aion_train/parallel/cross_entropy.py", "_VocabParallelCE.forward"),
    ("aion_train/parallel/expert_parallel.py", "AllToAllDispatcher.dispatch"),
    ("aion_train/parallel/grad_sync.py", "average_gradients"),
    ("aion_train/parallel/parallelize.py", "_sum_grad_over_tp.hook"),
    ("aion_train/posttrain/lora.py", "LoRALinear.__init__._sum_over_tp"),
    ("aion_train/posttrain/lora.py", "gather_lora_state_dict"),
}


def _raw_collectives():
    dirs = ["aion_train/parallel", "aion_train/posttrain", "aion_train/eval", "aion_train/rl", "aion_train/model"]
    files = [p for d in dirs for p in (REPO / d).rglob("*.py")]
    files += [
        REPO / f"aion_train/train/{n}.py"
        for n in ("trainer", "engine", "tasks/base", "tasks/text", "tasks/multimodal", "metrics")
    ]
    files.append(REPO / "aion_train/data/loader.py")
    found = set()
    for path in files:
        rel = path.relative_to(REPO).as_posix()

        def visit(node, scope):
            for ch in ast.iter_child_nodes(node):
                inner = scope + [ch.name] if isinstance(ch, (ast.FunctionDef, ast.ClassDef)) else scope
                f = getattr(ch, "func", None)
                if (
                    isinstance(ch, ast.Call)
                    and isinstance(f, ast.Attribute)
                    and isinstance(f.value, ast.Name)
                    and f.value.id == "dist"
                    and f.attr in COLLECTIVES
                ):
                    found.add((rel, ".".join(scope)))
                visit(ch, inner)

        visit(ast.parse(path.read_text()), [])
    return found


def test_bookkeeping_reductions_go_through_the_device_aware_helper():
    """A raw dist collective outside the list above (a loss, count or metric built on the
    CPU, reduced directly) would fail under NCCL: use collectives.all_reduce_."""
    found = _raw_collectives()
    assert found - ON_MODEL_TENSORS == set()
    assert ON_MODEL_TENSORS - found == set()  # the list stays true


# ------------------------------------------------------------------ reductions reach the comm device
def test_trainer_step_moves_the_batch_and_reduces_the_finite_flag_on_the_comm_device(fake_nccl):
    from aion_train.model.transformer import ModelOutput
    from aion_train.train.tasks import TextTask
    from aion_train.train.trainer import Trainer

    z = torch.zeros(())
    engine = OnMeta(result=lambda *a, **k: ModelOutput(logits=None, loss=z, lm_loss=z, aux_loss=z))
    engine.global_steps = 0
    trainer = Trainer.__new__(Trainer)
    trainer.engine, trainer.batch_device = engine, module_device(engine)
    trainer.task = TextTask.__new__(TextTask)
    batch = {k: torch.ones(2, 8, dtype=torch.long) for k in ("input_ids", "labels", "segment_ids", "position_ids")}
    with pytest.raises(Stop):
        trainer.train_step(iter([batch]))
    assert engine.seen == [{META}]
    assert fake_nccl == [META]


def test_global_grad_norm_reduces_on_the_comm_device(fake_nccl):
    from aion_train.parallel.grad_sync import global_grad_norm
    from aion_train.parallel.plan import ParallelPlan

    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(Stop):
        global_grad_norm(model, ParallelGroups(world=2, rank=0, tp=2, dp=1, tp_group=object()), ParallelPlan(tp=2))
    assert fake_nccl == [META]


@pytest.mark.parametrize("which", ["masked_mean", "mean_over_ranks", "mean_over_dp", "all_reduce_", "trainer"])
def test_metric_reductions_reach_the_comm_device(fake_nccl, which):
    from aion_train.parallel import collectives
    from aion_train.posttrain import common, ppo, ppo_math
    from aion_train.train import trainer

    groups = ParallelGroups(world=2, rank=0, tp=1, dp=2, dp_group=object())
    call = {
        "masked_mean": lambda: ppo_math.masked_mean(torch.ones(2, 3), torch.ones(2, 3), group=object()),
        "mean_over_ranks": lambda: common.mean_over_ranks(1.5),
        "mean_over_dp": lambda: ppo.mean_over_dp({"reward": 1.0, "kl": 0.1}, groups),
        "all_reduce_": lambda: collectives.all_reduce_(torch.zeros(2, dtype=torch.float64), group=object()),
        "trainer": lambda: trainer._all_reduce(torch.zeros(1), op=dist.ReduceOp.MIN),
    }[which]
    with pytest.raises(Stop):
        call()
    assert fake_nccl == [META]


def test_evaluate_accuracy_counts_reach_the_comm_device(fake_nccl, monkeypatch):
    from aion_train.posttrain import common
    from aion_train.posttrain import task as task_mod

    monkeypatch.setattr(common, "generate_answers", lambda model, prompts, *a, **k: [[5] for _ in prompts])
    monkeypatch.setattr(task_mod, "is_correct", lambda e, text: True)
    data = SimpleNamespace(tokenizer=SimpleNamespace(end_id=1, decode=lambda ids: "x"))
    examples = [SimpleNamespace(prompt_ids=[2, 3], kind=k) for k in ("a", "b", "a", "b")]
    groups = ParallelGroups(world=2, rank=0, tp=1, dp=2, dp_group=object())
    with pytest.raises(Stop):
        common.evaluate_accuracy(OnMeta(), data, examples, 2, groups)
    assert fake_nccl == [META]


# ------------------------------------------------------------------ batches reach the model's device
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from aion_train.data.shards import write_shards
    from aion_train.data.text_sources import demo_documents
    from aion_train.data.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("placement")
    docs = [d[:200] for d in demo_documents()[:24]]
    paths = write_shards([{"__key__": f"d{i:03d}", "txt": t} for i, t in enumerate(docs)], str(root), "val", 8)
    return paths, Tokenizer(train_tokenizer(demo_documents()[:120], str(root / "tok.model"), 600))


def test_step0_evaluation_moves_batches_and_reduces_on_the_comm_device(corpus, fake_nccl):
    from aion_train.config import load_config
    from aion_train.model.transformer import ModelOutput
    from aion_train.train.tasks import TextTask

    task = TextTask.__new__(TextTask)
    task.cfg = load_config(
        "configs/tiny_cpu.yaml", ["data.seq_len=32", "data.micro_batch_size=2", "train.eval_batches=2"]
    )
    task.groups = ParallelGroups(world=2, rank=0, tp=1, dp=2, dp_group=object())
    task.val_shards, task.tokenizer = corpus
    z = torch.zeros(())
    engine = OnMeta(result=lambda *a, **k: ModelOutput(logits=None, loss=z, lm_loss=z, aux_loss=z))
    with pytest.raises(Stop):
        task.evaluate(engine)
    assert engine.seen == [{META}, {META}]
    assert fake_nccl == [META]


def test_multimodal_batches_and_eval_device():
    from aion_train.train.tasks.multimodal import MultimodalTask, batch_to

    got = batch_to({"input_ids": torch.ones(1, 4), "image": torch.ones(1, 3), "vqa": [{"row": 0}]}, META)
    assert got["input_ids"].device == got["image"].device == META and got["vqa"] == [{"row": 0}]
    engine = OnMeta()
    task = MultimodalTask.__new__(MultimodalTask)
    with pytest.raises(Stop):
        task.forward(engine, {"input_ids": torch.ones(1, 4)}, module_device(engine))
    assert engine.seen == [{META}]


def test_sft_and_reward_batches_reach_the_model(monkeypatch):
    from aion_train.posttrain.common import sequence_logprobs
    from aion_train.posttrain.critic import Critic
    from aion_train.posttrain.reward import RewardModel, pair_accuracy, pair_batch, pair_loss
    from aion_train.posttrain.sft import lm_batch, lm_loss

    for run in (
        lambda m: lm_loss(m, lm_batch([[1, 2, 3], [4, 5]], [[0, 1, 1], [1, 1]], 0)),
        lambda m: pair_loss(m, pair_batch([([1, 2, 3], [1, 2])], 0)),
        lambda m: pair_accuracy(m, [([1, 2, 3], [1, 2])], lambda p: pair_batch(p, 0)),
        lambda m: sequence_logprobs(m, torch.ones(1, 3, dtype=torch.long)),
    ):
        model = OnMeta()
        with pytest.raises(Stop):
            run(model)
        assert model.seen == [{META}]
    # the heads drawn on the CPU follow their backbone's device
    backbone = nn.Linear(4, 4).to("meta")
    assert RewardModel(backbone, 4).head.weight.device == META
    assert Critic(backbone, 4).value_head.weight.device == META


def _ppo_bits():
    tok = SimpleNamespace(end_id=9, pad_id=0, decode=lambda ids: "x")
    task = SimpleNamespace(tokenizer=tok)
    pcfg = SimpleNamespace(max_new_tokens=2, temperature=1.0, beta=0.1, gamma=1.0, lam=0.95, whiten_advantages=True)
    examples = [SimpleNamespace(prompt_ids=[1, 2, 3]), SimpleNamespace(prompt_ids=[4, 5])]
    return task, pcfg, examples


def test_ppo_rollouts_and_minibatches_reach_the_models(monkeypatch):
    from aion_train.posttrain import ppo, rollout

    task, pcfg, examples = _ppo_bits()
    monkeypatch.setattr(rollout, "sample_responses", lambda *a, **k: [[7, 9], [8]])
    monkeypatch.setattr(ppo, "sample_responses", lambda *a, **k: [[7, 9], [8]])
    gen = torch.Generator().manual_seed(0)
    actor = OnMeta()
    with pytest.raises(Stop):
        rollout.make_experience(examples, actor, nn.Identity(), nn.Identity(), nn.Identity(), task, pcfg, gen)
    assert actor.seen == [{META}]
    actor = OnMeta()
    groups = ParallelGroups()
    with pytest.raises(Stop):
        ppo.heldout_kl(actor, nn.Identity(), task, examples, pcfg, groups, 0)
    assert actor.seen == [{META}]
    critic = OnMeta()
    with pytest.raises(Stop):
        rollout.response_values(critic, torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert critic.seen == [{META}]


def test_sampling_makes_the_prompt_ids_on_the_models_device():
    from aion_train.posttrain.common import generate_answers
    from aion_train.posttrain.rollout import sample_responses

    for run in (
        lambda m: sample_responses(m, [[1, 2]], 2, 9, 1.0, torch.Generator().manual_seed(0)),
        lambda m: generate_answers(m, [[1, 2], [3]], 2, 9),
    ):
        model = OnMeta()
        with pytest.raises(Stop):
            run(model)
        assert model.seen == [{META}]


def test_minibatch_rows_index_a_batch_on_another_device():
    from dataclasses import fields

    from aion_train.posttrain.rollout import RolloutBatch

    batch = RolloutBatch(**{f.name: torch.zeros(4, 3, device=META) for f in fields(RolloutBatch)})
    mb = batch.rows(torch.tensor([2, 0]))  # a CPU permutation (the CPU generator's)
    assert all(getattr(mb, f.name).device == META and getattr(mb, f.name).shape[0] == 2 for f in fields(mb))


def test_evaluation_commands_move_their_inputs_to_the_model():
    from aion_train.eval.multimodal import caption_retrieval, vqa_accuracy

    tok = SimpleNamespace(
        special_id=lambda name: {"<I>": 10, "</I>": 11, "<T>": 12, "</T>": 13}[name], encode=lambda text: [20, 21]
    )

    class FakeMM(OnMeta):
        mm = SimpleNamespace(pad_id=0, resampler_queries=2)

        def answer_logprobs(self, prompt, cands):
            return self(prompt)

        def encode_text(self, ids):
            return self(ids)

    model = FakeMM()
    with pytest.raises(Stop):
        vqa_accuracy(model, tok, [{"question": "q", "image": torch.ones(4, 6), "answer": "yes"}], ["yes", "no"])
    assert model.seen == [{META}]
    model = FakeMM()
    with pytest.raises(Stop):
        caption_retrieval(model, tok, [{"caption": "a", "image": torch.ones(4, 6)}])
    assert model.seen == [{META}]
