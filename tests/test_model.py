"""Level 2 correctness: our decoder vs transformers on tiny random configs of every family."""
import json
import os

import pytest
import torch
from helpers import FAMILIES, assert_close, tiny_hf_model
from safetensors.torch import save_file

from treepo import Engine, SamplingParams
from treepo.engine.loader import load_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family):
    hf = tiny_hf_model(family)
    eng = Engine.from_model(hf, num_pages=64, page_size=4)
    ids = torch.randint(3, 160, (3, 37))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding must not change the earlier positions
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        ours = eng.model.logits(eng.model(ids, attention_mask=mask))
    for b in range(3):
        n = int(mask[b].sum())
        assert_close(ours[b, :n], ref[b, :n], atol=1e-4, what=f"{family} logits row {b}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_paged_prefill_logits_match_transformers(family):
    """The engine's paged forward (flat ragged batch) gives transformers' last-token logits."""
    hf = tiny_hf_model(family)
    eng = Engine.from_model(hf, num_pages=64, page_size=4)
    prompts = [torch.randint(3, 160, (n,)).tolist() for n in (1, 5, 9, 16)]
    seqs = [eng.new_sequence(p) for p in prompts]
    logits = eng.forward(seqs)
    for s, p, row in zip(seqs, prompts, logits):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1]
        assert_close(row, ref, atol=1e-4, what=f"{family} prompt len {len(p)}")
        eng.free(s)
    assert eng.kv.num_used == 0


@pytest.mark.parametrize("family", ["llama3_rope_gqa3", "qwen3_norms_gqa4", "qwen2_bias_gqa3"])
def test_greedy_generation_matches_transformers(family):
    hf = tiny_hf_model(family)
    eng = Engine.from_model(hf, num_pages=128, page_size=4)
    prompts = [[5, 9, 33, 7, 100], list(range(10, 31)), [42], [7, 7, 7, 8, 9, 10, 11, 12, 13]]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, o in zip(prompts, outs):
        want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        got = o[0]
        assert got.token_ids == want
        assert got.finish_reason == "length"
        with torch.no_grad():  # log-prob of each token = log_softmax of transformers' logits
            lp = torch.log_softmax(hf(torch.tensor([p + got.token_ids])).logits[0].float(), -1)
        ref = lp[len(p) - 1:-1].gather(-1, torch.tensor(got.token_ids)[:, None])[:, 0]
        assert_close(torch.tensor(got.logprobs), ref, atol=1e-4, what="greedy logprobs")
    assert eng.kv.num_used == 0


def _save_checkpoint(hf, path, shards=1):
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="20KB" if shards > 1 else "10GB")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_checkpoint_dir(tmp_path, dtype):
    hf = tiny_hf_model("qwen2_bias_gqa3")
    _save_checkpoint(hf, tmp_path, shards=2)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")  # really sharded
    model = load_model(str(tmp_path), dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    ids = torch.randint(3, 160, (2, 11))
    with torch.no_grad():
        ref = hf.to(getattr(torch, dtype))(ids).logits
        ours = model.logits(model(ids))
    tol = 1e-4 if dtype == "float32" else 0.05
    assert_close(ours, ref, atol=tol, what=f"{dtype} logits")


def test_load_errors_name_the_problem(tmp_path):
    hf = tiny_hf_model("llama_gqa4_untied")
    _save_checkpoint(hf, tmp_path)
    from safetensors.torch import load_file
    state = load_file(tmp_path / "model.safetensors")

    state_missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state_missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(str(tmp_path))

    state_bad = dict(state)
    state_bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(state_bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mis-shaped.*k_proj.weight: \(3, 3\) \(expected \(12, 48\)\)"):
        load_model(str(tmp_path))

    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupted or unreadable"):
        load_model(str(tmp_path))

    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(str(tmp_path / "nope"))

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_real_smollm2_greedy_matches_transformers():
    """The bundled SmolLM2-135M-Instruct: our engine's greedy text equals transformers' (fp32)."""
    from transformers import AutoModelForCausalLM

    from treepo.assets import bundled_model_path
    from treepo.engine.tokenizer import chat_prompt_ids

    path = bundled_model_path()
    eng = Engine.from_pretrained(path, dtype="float32")
    ids = chat_prompt_ids(eng.tokenizer, "What is 12 + 7? Answer briefly.")
    out = eng.generate([ids], SamplingParams(temperature=0, max_tokens=40))[0][0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=40, do_sample=False, eos_token_id=eng.tokenizer.eos_token_id)[0, len(ids):]
    assert out.token_ids == want.tolist()
    assert out.text == eng.tokenizer.decode(want, skip_special_tokens=True)
    assert "19" in out.text


def test_sliding_window_caps_max_model_len():
    from treepo.engine.config import ModelConfig

    hf = tiny_hf_model("mistral_gqa4").config.to_dict()
    hf["sliding_window"] = 64
    cfg = ModelConfig.from_hf(hf)
    assert cfg.sliding_window == 64 and cfg.max_model_len == 64  # never runs past the window: exact
    hf["sliding_window"] = None
    assert ModelConfig.from_hf(hf).max_model_len == hf["max_position_embeddings"]
