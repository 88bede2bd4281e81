"""treepo inside TRL's GRPOTrainer (issue 17): the rollout_func contract, TreePO advantages in TRL's
loss, and fresh weights in the engine after an optimizer step. CPU, a tiny random Llama."""
import copy
import os

import pytest
import torch
from trainer_fixtures import char_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl", reason="trl is installed by the test set-up (pip install -e '.[test]')")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from treepo import TreeConfig  # noqa: E402
from treepo.advantages import broadcast_to_tokens, tree_advantages, whiten  # noqa: E402
from treepo.integrations.trl import PLACEHOLDER, TreePOGRPOTrainer, tree_rollout_func  # noqa: E402
from treepo.rollout.tree import FINISH_REASONS  # noqa: E402

G = 4
TREE = TreeConfig(segment_len=4, max_depth=3, max_width=G, branch_factor=2, fallback_candidates="any")
QUESTIONS = ["add 2 and 3", "what is 7?", "say ok", "count to 3"]


def even_reward(completions, completion_ids, **kwargs):
    """In [-1, 1]: how much more often a completion uses even token ids than odd ones."""
    assert "treepo_path" in kwargs and "treepo_finish_reason" in kwargs  # the rollout's extra keys arrive
    return [2.0 * sum(t % 2 == 0 for t in ids) / max(len(ids), 1) - 1.0 for ids in completion_ids]


def tiny_model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_trainer(tmp_path, cls=TreePOGRPOTrainer, steps=2, lr=1e-3, **kw):
    tok = char_tokenizer()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * G, num_generations=G,
                      max_completion_length=12, max_steps=steps, learning_rate=lr, temperature=0.9,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                      lr_scheduler_type="constant", warmup_steps=0)
    if cls is TreePOGRPOTrainer:
        kw.setdefault("tree_config", TREE)
        kw.setdefault("engine_settings", {"kv_cache_memory": 2**24})
    return cls(model=tiny_model(tok), reward_funcs=[even_reward], args=args, train_dataset=data,
               processing_class=tok, **kw)


def hf_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def repeated(questions):
    return [[{"role": "user", "content": q}] for q in questions for _ in range(G)]


def test_rollout_rows_match_trl_contract(tmp_path):
    trainer = make_trainer(tmp_path)
    rollout = trainer.rollout_func
    prompts = repeated(QUESTIONS[:3])
    out = rollout(prompts, trainer)
    rec = rollout.last
    n = len(prompts)
    assert {"prompt_ids", "completion_ids", "logprobs"} <= set(out)
    assert all(len(v) == n for v in out.values()), {k: len(v) for k, v in out.items()}
    tokenized = trainer._tokenize_prompts(prompts[::G])[0]  # TRL's own chat-templated ids
    for r in range(n):
        g = r // G
        assert rec.group[r] == g and out["prompt_ids"][r] == list(tokenized[g])
        tree = rec.generation.trees[g]
        if out["treepo_leaf"][r]:  # the g-th tree's leaves, in order, fill its G rows
            leaf = tree.leaves[r % G]
            assert out["completion_ids"][r] == leaf.token_ids and out["treepo_path"][r] == leaf.path
            assert out["treepo_finish_reason"][r] == leaf.finish_reason in FINISH_REASONS
            ref = hf_logprobs(trainer.model, out["prompt_ids"][r], out["completion_ids"][r], 0.9)
            torch.testing.assert_close(torch.tensor(out["logprobs"][r]), ref, atol=2e-4, rtol=0)
        else:
            assert out["treepo_finish_reason"][r] == PLACEHOLDER and out["env_mask"][r] == [0]
    assert len(rec.generation.trees) == 3
    assert sum(out["treepo_leaf"]) == sum(len(t.leaves) for t in rec.generation.trees)
    assert trainer._metrics["train"]["treepo/compute_saved_vs_sequential"][-1] > 0
    assert rollout.weight_sync.last.mode == "shared"  # plain model, same dtype: the engine uses its tensors


def test_rollout_refuses_split_groups(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="not a multiple of num_generations=4"):
        trainer.rollout_func(repeated(QUESTIONS[:1])[:3], trainer)
    mixed = repeated(QUESTIONS[:2])
    mixed[1] = mixed[5]
    with pytest.raises(ValueError, match="not one prompt repeated"):
        trainer.rollout_func(mixed, trainer)


def test_trainer_steps_use_tree_advantages_in_trl_loss(tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    generations, losses = [], []
    score = trainer._generate_and_score_completions
    compute = trainer._compute_loss

    def record_generation(inputs):
        out = score(inputs)
        generations.append((copy.deepcopy(trainer.rollout_func.last), trainer.tree_advantages_last.clone()))
        return out

    def record_loss(model, inputs):
        losses.append({k: inputs[k].detach().clone() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                 "completion_mask", "advantages")})
        return compute(model, inputs)

    trainer._generate_and_score_completions = record_generation
    trainer._compute_loss = record_loss
    trainer.train()
    assert len(generations) == 2 and len(losses) == 2
    for (rec, per_leaf), got in zip(generations, losses):
        rows = [i for i, leaf in enumerate(rec.leaf) if leaf is not None]
        rewards = torch.tensor(even_reward(None, [rec.completion_ids[i] for i in rows],
                                           treepo_path=0, treepo_finish_reason=0))
        A = tree_advantages(rewards, [rec.paths[i] for i in rows], torch.tensor([rec.group[i] for i in rows]))
        T = max(len(rec.completion_ids[i]) for i in rows)
        mask = torch.zeros(len(rows), T)
        for j, i in enumerate(rows):
            mask[j, :len(rec.completion_ids[i])] = 1
        want_tokens = whiten(broadcast_to_tokens(A, mask), mask)
        expected = {}
        for j, i in enumerate(rows):
            key = (tuple(rec.prompt_ids[i]), tuple(rec.completion_ids[i]))
            expected.setdefault(key, []).append(round(float(want_tokens[j, 0]), 4))
        # the rows TRL's loss saw (shuffled): identify each by its prompt and completion ids
        seen = {}
        adv = got["advantages"]
        assert adv.shape == got["completion_mask"].shape  # per-token advantages, row-aligned
        for r in range(adv.shape[0]):
            p = got["prompt_ids"][r][got["prompt_mask"][r].bool()].tolist()
            m = got["completion_mask"][r].bool()
            c = got["completion_ids"][r][m].tolist()
            vals = adv[r][m]
            assert torch.allclose(vals, vals[0].expand_as(vals), atol=1e-6)  # one value per leaf
            assert float(adv[r][~m].abs().sum()) == 0.0  # 0 on padding
            if (tuple(p), tuple(c)) in expected:
                seen.setdefault((tuple(p), tuple(c)), []).append(round(float(vals[0]), 4))
        assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in expected.items()}
        torch.testing.assert_close(per_leaf[rows], A.float(), atol=1e-5, rtol=0)
    logged = [m for m in trainer.state.log_history if "treepo/compute_saved_vs_sequential" in m]
    assert logged and all(0 < m["treepo/compute_saved_vs_sequential"] < 1 for m in logged)


def test_engine_samples_with_updated_weights(tmp_path):
    trainer = make_trainer(tmp_path, steps=1, lr=5e-2)
    prompts = repeated(QUESTIONS[:2])
    trainer.rollout_func(prompts, trainer)  # builds the engine on the model
    # a separate model with the weights before the step (not a deepcopy of trainer.model: accelerate
    # patches its forward, and a copy's forward would still run the trained module)
    before = tiny_model(char_tokenizer())
    before.load_state_dict({k: v.clone() for k, v in trainer.model.state_dict().items()})
    trainer.train()  # one optimizer step
    moved = max(float((a - b).abs().max()) for a, b in zip(trainer.model.parameters(), before.parameters()))
    assert moved > 1e-3, "the step did not change the weights; the test would prove nothing"
    out = trainer.rollout_func(prompts, trainer)
    changed = 0
    for r in range(len(prompts)):
        if not out["treepo_leaf"][r]:
            continue
        p, c = out["prompt_ids"][r], out["completion_ids"][r]
        now = hf_logprobs(trainer.model, p, c, 0.9)
        torch.testing.assert_close(torch.tensor(out["logprobs"][r]), now, atol=2e-4, rtol=0)
        changed += float((hf_logprobs(before, p, c, 0.9) - now).abs().max()) > 1e-3
    assert changed, "log-probs under the old weights equal the new ones: the check cannot tell stale from fresh"


def test_plain_grpo_trainer_takes_the_tree_rollout(tmp_path):
    """The rollout alone in TRL's own GRPOTrainer (TRL's group advantage over tree leaves)."""
    trainer = make_trainer(tmp_path, cls=GRPOTrainer, steps=1,
                           rollout_func=tree_rollout_func(TREE, engine_settings={"kv_cache_memory": 2**24}))
    trainer.train()
    assert trainer.rollout_func.calls == 1
    assert any("treepo/tokens_processed" in m for m in trainer.state.log_history)


def test_trainer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="rollout_func: a function"):
        make_trainer(tmp_path, rollout_func=lambda prompts, trainer: {}, tree_config=None, engine_settings=None)
    with pytest.raises(ValueError, match="aggregation='mean'"):
        make_trainer(tmp_path, aggregation="mean")
    trainer = make_trainer(tmp_path, tree_config=TreeConfig(segment_len=8, max_depth=4, max_width=G))
    with pytest.raises(ValueError, match="max_response_len=32 exceeds the trainer's max_completion_length=12"):
        trainer.rollout_func(repeated(QUESTIONS[:1]), trainer)


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["tree", "trl", "engine"])
def test_example_runs_on_the_bundled_model(tmp_path, rollout):
    """examples/trl_treepo.py, one tiny step of each variant (the real SmolLM2 weights: slow)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / rollout
    cmd = [sys.executable, os.path.join(root, "examples", "trl_treepo.py"), "--rollout", rollout, "--steps", "1",
           "--prompts", "2", "--generations", "2", "--max_tokens", "16", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True)
    (step,) = [json.loads(line) for line in open(out / "steps.jsonl")]
    assert step["step"] == 1 and step["rows"] == 4 and 0 <= step["accuracy"] <= 1
    assert ("tokens_processed" in step) == (rollout != "trl")
    again = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    assert again.returncode != 0 and "holds a run" in again.stderr  # a finished run is not overwritten
