"""treepo.tree_generate: the plain-function tree decoder for other projects (issue 17)."""
import pytest
import torch
from trainer_fixtures import char_tokenizer

from treepo import Engine, SamplingParams, TreeConfig, tree_generate
from treepo.advantages import broadcast_to_tokens, tree_advantages, whiten
from treepo.tree_generate import prompt_token_ids

CFG = TreeConfig(segment_len=4, max_depth=3, max_width=6, branch_factor=2, fallback_candidates="any")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def hf_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_rows_follow_the_trees_and_the_model(model, tok):
    prompts = ["what is 2+3?", [{"role": "user", "content": "say hi"}], tok.encode("abc")]
    out = tree_generate(model, tok, prompts, CFG, SamplingParams(temperature=0.8, seed=3), kv_cache_memory=2**24)
    assert len(out) == sum(len(t.leaves) for t in out.trees) > len(prompts)
    assert out.prompt_ids[0] == prompt_token_ids(tok, prompts[0])
    assert out.prompt_ids[0] == tok.encode(tok.apply_chat_template([{"role": "user", "content": prompts[0]}],
                                                                   add_generation_prompt=True, tokenize=False),
                                           add_special_tokens=False)
    j = 0
    for i, tree in enumerate(out.trees):
        for leaf in tree.leaves:  # tree order, then leaf order
            assert out.prompt_index[j] == i and out.prompt_ids[j] == tree.prompt_token_ids
            assert out.completion_ids[j] == leaf.token_ids and out.paths[j] == leaf.path
            assert out.finish_reasons[j] == leaf.finish_reason and out.texts[j] == tok.decode(leaf.token_ids,
                                                                                              skip_special_tokens=True)
            depth_ids = out.subgroup_ids[j]
            assert all(x >= 0 for x in depth_ids[:leaf.depth]) and all(x == -1 for x in depth_ids[leaf.depth:])
            j += 1
    # leaves sharing a node share a subgroup id at that depth and their tokens up to it
    for a in range(len(out)):
        for b in range(len(out)):
            for k in range(min(len(out.paths[a]), len(out.paths[b]))):
                same = out.prompt_index[a] == out.prompt_index[b] and out.paths[a][k] == out.paths[b][k]
                assert (out.subgroup_ids[a][k] == out.subgroup_ids[b][k]) == same
                if same:
                    n = (k + 1) * CFG.segment_len
                    assert out.completion_ids[a][:n] == out.completion_ids[b][:n]
    # every leaf's log-probs are the model's own (temperature 0.8, no truncation) on prompt + completion
    for j in range(len(out)):
        ref = hf_logprobs(model, out.prompt_ids[j], out.completion_ids[j], 0.8)
        torch.testing.assert_close(torch.tensor(out.logprobs[j]), ref, atol=2e-4, rtol=0)
    assert out.processed_tokens < out.sequential_tokens and 0 < out.compute_saved < 1


def test_advantages_are_treepo_tree_advantages(model, tok):
    eng = Engine.from_model(model, tok, kv_cache_memory=2**24)
    out = tree_generate(eng, tok, ["one", "two"], CFG, SamplingParams(temperature=1.0, seed=0))
    rewards = [float(sum(c) % 3) - 1.0 for c in out.completion_ids]
    raw = tree_advantages(torch.tensor(rewards), out.paths, torch.tensor(out.prompt_index))
    torch.testing.assert_close(out.advantages(rewards, whiten_tokens=False), raw)
    mask = out.completion_mask()
    tokens = whiten(broadcast_to_tokens(raw, mask), mask)
    got = out.advantages(rewards)
    for j, c in enumerate(out.completion_ids):  # each leaf's value is the one all its tokens carry
        torch.testing.assert_close(tokens[j, :len(c)], got[j].expand(len(c)), atol=1e-6, rtol=0)
    assert abs(float((got * mask.sum(1)).sum())) < 1e-3  # token-weighted mean 0
    with pytest.raises(ValueError, match="rewards: 3 values for"):
        out.advantages([0.0, 1.0, 2.0])


def test_same_key_same_tree_whatever_the_batch(model, tok):
    eng = Engine.from_model(model, tok, kv_cache_memory=2**24)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = tree_generate(eng, tok, ["two"], CFG, params, keys=[11])
    batch = tree_generate(eng, tok, ["one", "two"], CFG, params, keys=[10, 11])
    mine = [j for j, i in enumerate(batch.prompt_index) if i == 1]
    assert [batch.completion_ids[j] for j in mine] == alone.completion_ids


def test_bad_input_is_named(model, tok):
    with pytest.raises(ValueError, match="not a single prompt"):
        tree_generate(model, tok, "just one", CFG)
    with pytest.raises(ValueError, match="empty list"):
        tree_generate(model, tok, [], CFG)
    with pytest.raises(ValueError, match="need a tokenizer"):
        tree_generate(model, None, ["text"], CFG)
    with pytest.raises(ValueError, match=r"prompt '3.0' \(float\)"):
        prompt_token_ids(tok, 3.0)
    with pytest.raises(ValueError, match="model_or_engine: a str"):
        tree_generate("gpt2", tok, ["x"], CFG)
    eng = Engine.from_model(model, tok, kv_cache_memory=2**24)
    with pytest.raises(ValueError, match="ready Engine"):
        tree_generate(eng, tok, ["x"], CFG, kv_cache_memory=2**20)
