"""Trainer level 3 correctness: learning, FSDP 1 vs 2 processes, checkpoints and HF export."""
import json
import os
import subprocess
import sys

import pytest
import torch

from trainer_fixtures import tiny_checkpoint, write_task

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return tiny_checkpoint(str(d / "model")), write_task(str(d / "task.jsonl"))


def flags(model, task, out, **kw):
    base = dict(model=model, train_jsonl=task, heldout_size=4, output_dir=out, steps=3, prompts_per_step=4,
                leaves=4, segment_len=4, max_depth=3, branch_factor=2, max_response_len=12,
                engine_dtype="float32", lr=3e-3, warmup_steps=1, eval_every=0, eval_n=1, eval_max_tokens=4,
                eval_gsm8k=False, save_every=0, export_hf=False, dynamic_sampling=False,
                reward_fn="trainer_fixtures:even_token_reward", micro_batch_size=4)
    base.update(kw)
    out = []
    for k, v in base.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return out


def run(args, nproc=1, timeout=300):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "treepo.train", *args]
    else:
        import socket

        with socket.socket() as sock:  # a free loopback port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "treepo.train", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("mode", ["tree", "sequential"])
def test_learns_a_trivial_reward(tiny, tmp_path, mode):
    model, task = tiny
    out = str(tmp_path / mode)
    run(flags(model, task, out, steps=10, mode=mode, lr=2e-2, leaves=8, micro_batch_size=16))
    recs = [r for r in metrics(out) if "reward/mean" in r]
    first, last = recs[0]["reward/mean"], sum(r["reward/mean"] for r in recs[-2:]) / 2
    assert last > first + 0.4, [round(r["reward/mean"], 3) for r in recs]
    assert all(r["reward/failures"] == 0 for r in recs)
    # the engine (fp32, paged attention) and the trainer (dense forward) see the same model
    gaps = [r["mismatch/sampler_vs_trainer_logp"] for r in recs]
    assert max(gaps) < 1e-4, gaps


def test_evaluation_scores_with_the_configured_reward_fn(tiny):
    from trainer_fixtures import even_token_reward

    from treepo import Engine, SamplingParams
    from treepo.engine.tokenizer import chat_prompt_ids
    from treepo.train.data import INSTRUCTION, Problem
    from treepo.train.evaluate import evaluate
    from treepo.train.rewards.problems import ProblemScorer

    model, _ = tiny
    eng = Engine.from_pretrained(model, dtype="float32")
    probs = [Problem(f"Say anything {i}.", "0", "task") for i in range(3)]
    kw = dict(n=4, temperature=1.0, max_tokens=8, seed=0)
    ev = evaluate(eng, probs, ProblemScorer("trainer_fixtures:even_token_reward"), **kw)
    prompts = [chat_prompt_ids(eng.tokenizer, f"{p.question}\n{INSTRUCTION}") for p in probs]
    outs = eng.generate(prompts, SamplingParams(**kw))
    accs = [float(even_token_reward(c.text, {"response_ids": c.token_ids}) > 0) for cs in outs for c in cs]
    assert 0 < sum(accs) < len(accs)  # the check below can tell the two reward functions apart
    assert ev["task"]["mean@n"] == pytest.approx(sum(accs) / len(accs))
    builtin = evaluate(eng, probs, ProblemScorer(None), **kw)  # random text never boxes the gold "0"
    assert builtin["task"]["mean@n"] == 0.0


def test_fsdp_two_processes_match_one(tiny, tmp_path):
    model, task = tiny
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(flags(model, task, one, steps=2, warmup_steps=2))
    run(flags(model, task, two, steps=2, warmup_steps=2), nproc=2)
    a = [r for r in metrics(one) if "actor/pg_loss" in r]
    b = [r for r in metrics(two) if "actor/pg_loss" in r]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["reward/mean"] == pytest.approx(rb["reward/mean"], abs=1e-6)  # same samples
        for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "adv/mean", "adv/std",
                  "mismatch/sampler_vs_trainer_logp"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-5), k
    # actor/lr is the rate the step used: half of lr during the 2-step warm-up, then lr
    assert [r["actor/lr"] for r in a] == pytest.approx([3e-3 / 2, 3e-3])
    # held-out evaluation over 4 problems: each rank scores 2, the reduction gives all 4
    ev_one = [r for r in metrics(one) if "eval/heldout/problems" in r]
    ev_two = [r for r in metrics(two) if "eval/heldout/problems" in r]
    assert [r["eval/heldout/problems"] for r in ev_two] == [r["eval/heldout/problems"] for r in ev_one] == [4, 4]
    for r1, r2 in zip(ev_one, ev_two):
        assert sorted(r1) == sorted(r2)


def test_resume_matches_uninterrupted_and_export_loads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from treepo.train.checkpoint import latest_checkpoint, load_checkpoint

    model, task = tiny
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(flags(model, task, full, steps=3, export_hf=True))
    run(flags(model, task, part, steps=2))
    run(flags(model, task, part, steps=3, resume=True))
    a = [r for r in metrics(full) if "actor/pg_loss" in r]
    b = [r for r in metrics(part) if "actor/pg_loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3]
    for k in ("reward/mean", "actor/pg_loss", "actor/grad_norm"):
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-4, abs=1e-6), k
    # the HF export loads in transformers with our engine's logits
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(full, "hf")).eval()
    from treepo.engine.loader import load_model
    ours = load_model(os.path.join(full, "hf"))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=1e-5, rtol=0)
    # a partial checkpoint (no completion mark) is detected
    ck = latest_checkpoint(os.path.join(part, "checkpoints"))
    os.remove(os.path.join(ck, "treepo_meta.json"))
    with pytest.raises(ValueError, match="incomplete or corrupted"):
        load_checkpoint(ck, None, None)
