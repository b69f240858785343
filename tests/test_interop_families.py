"""import-hf / export-hf for Llama, Mistral, Qwen2 (dense) and Qwen2-MoE, with their tokenizers:
tiny random models made here with `transformers`, logits equal in fp32 (1e-4) both ways, the same
greedy tokens, the family and tokenizer kept on export, and what our model cannot express
refused with its name."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from aion_train import cli  # noqa: E402
from aion_train.checkpoint import load_full_state_dict, model_config_from_dict  # noqa: E402
from aion_train.data.tokenizer import load_tokenizer  # noqa: E402
from aion_train.interop.hf_mixtral import NotExpressibleError  # noqa: E402
from aion_train.model import build_model  # noqa: E402

V = 300
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,  # logits that vary (std ~1), so equality means something
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    ),
}


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(topics.values())[:30], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>"
    )
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(out))
    return out


def make_hf(family: str, path, tok_dir, **overrides):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    hc = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides}, bos_token_id=1, eos_token_id=2)
    model = getattr(transformers, model_cls)(hc).eval()
    if family == "qwen2_moe":  # the one shared-expert gate our model expresses: all zero (0.5)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.shared_expert_gate.weight.zero_()
    model.save_pretrained(str(path))
    for f in tok_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    # as the family ships it: transformers' tokenizer class of the model type, saved again
    transformers.AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(path))
    return model


def ours(run) -> torch.nn.Module:
    cfg_dict, sd = load_full_state_dict(run)
    model = build_model(model_config_from_dict(cfg_dict))
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_logits_greedy_and_tokenizer(family, tmp_path, hf_tokenizer_dir, capsys):
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    theirs = make_hf(family, hf_dir, hf_tokenizer_dir)
    layout = ["--tp", "2", "--ep", "2"] if family == "qwen2_moe" else ["--tp", "2"]
    assert cli.main(["import-hf", "--hf", str(hf_dir), "--out", str(run), *layout, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["family"] == family and summary["tokenizer"].endswith("hf_source/tokenizer.json")
    model = ours(run)
    assert (model.cfg.moe.every == 0) == (family != "qwen2_moe")

    tok = load_tokenizer(summary["tokenizer"])
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    text = "def f(x):\n    return x ** 2  # the square"
    assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (ref_tok.bos_token_id, ref_tok.eos_token_id, V)

    ids = torch.tensor([[tok.bos_id, *tok.encode(text)]])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, theirs(ids).logits
    assert b.std() > 0.5 and (a - b).abs().max().item() < 1e-4
    want = theirs.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)[0].tolist()
    assert greedy(model, ids, 10) == want

    assert cli.main(["export-hf", "--checkpoint", str(run), "--out", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back).__name__ == FAMILIES[family][1]
    with torch.no_grad():
        assert (back(ids).logits - a).abs().max().item() < 1e-4
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    gen = pipe("def f(x):", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert gen.startswith("def f(x):") and len(gen) > len("def f(x):")


def test_what_our_model_cannot_express_is_named(tmp_path, hf_tokenizer_dir, capsys):
    from aion_train.interop.hf_families import config_from_hf

    q = make_hf("qwen2", tmp_path / "q", hf_tokenizer_dir)
    with torch.no_grad():
        q.model.layers[1].self_attn.k_proj.bias.fill_(0.25)  # a trained Qwen2 has these
    q.save_pretrained(str(tmp_path / "q"))
    assert cli.main(["import-hf", "--hf", str(tmp_path / "q"), "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_proj.bias: non-zero attention bias" in err and not (tmp_path / "r1").exists()

    m = make_hf("qwen2_moe", tmp_path / "m", hf_tokenizer_dir)
    with torch.no_grad():
        m.model.layers[0].mlp.shared_expert_gate.weight.normal_()
    m.save_pretrained(str(tmp_path / "m"))
    assert cli.main(["import-hf", "--hf", str(tmp_path / "m"), "--out", str(tmp_path / "r2")]) == 2
    assert "model.layers.0.mlp.shared_expert_gate.weight: a per-token sigmoid gate" in capsys.readouterr().err

    hc = json.loads((tmp_path / "q" / "config.json").read_text())
    with pytest.raises(NotExpressibleError, match="llama3"):
        config_from_hf(dict(hc, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}))
    with pytest.raises(NotExpressibleError, match="hidden_act='gelu'"):
        config_from_hf(dict(hc, hidden_act="gelu"))
    with pytest.raises(NotExpressibleError, match="mlp_only_layers"):
        config_from_hf(dict(json.loads((tmp_path / "m" / "config.json").read_text()), mlp_only_layers=[1]))
    with pytest.raises(NotExpressibleError, match="model_type='gpt2'"):
        from aion_train.interop.hf import import_any

        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        import_any(tmp_path / "g", tmp_path / "r3")
    cfg, notes = config_from_hf(dict(hc, use_sliding_window=True, sliding_window=64))
    assert cfg.max_seq_len == 64 and "sliding_window" in notes[0]
    # a dense model of ours cannot be exported as Qwen2-MoE, and the reason is named
    assert cli.main(["import-hf", "--hf", str(tmp_path / "q"), "--out", str(tmp_path / "r4")]) == 2
    make_hf("llama", tmp_path / "l", hf_tokenizer_dir)
    assert cli.main(["import-hf", "--hf", str(tmp_path / "l"), "--out", str(tmp_path / "r5")]) == 0
    argv = ["export-hf", "--checkpoint", str(tmp_path / "r5"), "--out", str(tmp_path / "e"), "--family", "qwen2_moe"]
    assert cli.main(argv) == 2
    assert "model.moe.every=0: Qwen2-MoE has MoE layers" in capsys.readouterr().err
