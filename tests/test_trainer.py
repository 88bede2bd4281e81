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
                reward_fn="trainer_fixtures:even_token_reward", micro_batch_tokens=64)
    base.update(kw)
    out = []
    for k, v in base.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return out


def run(args, nproc=1, timeout=300, rc=0, env=None, module="treepo.train"):
    """The trainer in a subprocess (`python -m module`, or torchrun with nproc > 1); asserts its
    exit status is rc (-9: killed by TREEPO_FAULT)."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", *module.split(), *args]
    else:
        import socket

        with socket.socket() as sock:  # a free loopback port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "treepo.train", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == rc, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("mode", ["tree", "sequential"])
def test_learns_a_trivial_reward(tiny, tmp_path, mode):
    model, task = tiny
    out = str(tmp_path / mode)
    run(flags(model, task, out, steps=10, mode=mode, lr=2e-2, leaves=8, micro_batch_tokens=256))
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
    # two replaces an earlier run (--overwrite: its files go once the model has loaded; others stay)
    os.makedirs(os.path.join(two, "checkpoints", "step_000009"))
    for name in ("metrics.jsonl", "config.json", "notes.txt"):
        with open(os.path.join(two, name), "w") as f:
            f.write('{"step": 9}\n')
    run(flags(model, task, two, steps=2, warmup_steps=2, overwrite=True), nproc=2)
    assert os.path.exists(os.path.join(two, "notes.txt"))
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["latest", "step_000002"]
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
        for k in r1:  # samples are seeded by each problem's global index: same metrics for any world size
            if k.startswith("eval/"):
                assert r1[k] == pytest.approx(r2[k], abs=1e-9), k


def test_two_steps_with_packing_equal_two_without(tiny, tmp_path):
    """The default packing (tree) and prompt packing train as the padded rows do: same samples,
    same losses and gradient norms, while computing fewer tokens."""
    runs = {}
    for packing in ("none", "prompt", "tree"):
        out = str(tmp_path / packing)
        run(flags(*tiny, out, steps=2, packing=packing))
        runs[packing] = [r for r in metrics(out) if "actor/pg_loss" in r]
    for packing in ("prompt", "tree"):
        assert len(runs[packing]) == len(runs["none"]) == 2
        for a, b in zip(runs["none"], runs[packing]):
            assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)  # same samples
            for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "adv/std",
                      "mismatch/sampler_vs_trainer_logp", "packing/unique_tokens", "packing/leaf_tokens"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (packing, k)
    t, p, n = (runs[k][0]["packing/forward_tokens"] for k in ("tree", "prompt", "none"))
    assert t < p < n and runs["tree"][0]["packing/padding_avoided"] == n - t


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """An uninterrupted 3-step run with the HF export."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    run(flags(*tiny, out, steps=3, export_hf=True))
    return out


def test_resume_matches_uninterrupted_and_export_loads(tiny, straight, tmp_path):
    from transformers import AutoModelForCausalLM

    from treepo.train.checkpoint import latest_checkpoint, load_checkpoint

    model, task = tiny
    full, part = straight, str(tmp_path / "part")
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


KILL_AT_2 = {"TREEPO_FAULT": "checkpoint_after_shards@2"}  # SIGKILL once step 2's shards are written


@pytest.fixture(scope="module")
def killed(tiny, tmp_path_factory):
    """A 3-step run saving every step, SIGKILLed inside step 2's checkpoint, then resumed:
    (output dir, its checkpoints/ listing and `latest` right after the kill)."""
    out = str(tmp_path_factory.mktemp("killed") / "run")
    kw = dict(steps=3, save_every=1, keep_checkpoints=2)
    run(flags(*tiny, out, **kw), rc=-9, env=KILL_AT_2)
    ck = os.path.join(out, "checkpoints")
    after_kill = sorted(os.listdir(ck)), open(os.path.join(ck, "latest")).read()
    run(flags(*tiny, out, **kw, resume=True))
    return out, after_kill


def test_a_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_metrics(straight, killed):
    out, (listing, latest) = killed
    assert listing == ["latest", "step_000001", "step_000002.tmp"] and latest == "step_000001"
    recs = metrics(out)
    # step 2 was logged before the kill and redone after the resume: metrics.jsonl holds it once
    train = [r for r in recs if "actor/pg_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    resumed = [r for r in recs if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"].endswith("step_000001") and resumed[0]["step"] == 1
    assert resumed[0]["dropped_records"] == 1
    ref = [r for r in metrics(straight) if "resumed_from" not in r]
    assert len(ref) == len(recs) - 1
    for a, b in zip(ref, [r for r in recs if "resumed_from" not in r]):
        assert sorted(a) == sorted(b)
        for k, v in a.items():
            if not k.startswith(("timing/", "perf/")):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k)
    # pruned to the newest 2 complete checkpoints; the crashed save's .tmp is gone
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_000002", "step_000003"]


def _one_line_error(res, *needles):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and lines[-1].startswith("treepo train: error: "), res.stderr[-3000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def test_a_damaged_checkpoint_is_a_one_line_error_before_loading(tiny, killed, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(killed[0], out)
    shard = os.path.join(out, "checkpoints", "step_000003", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(200)
        f.write(bytes(b ^ 0xFF for b in f.read(40)))
    args = flags("/no/such/model", tiny[1], out, steps=4, resume=True)  # refused before the model is looked at
    for module in ("treepo.train", "treepo.cli train"):
        res = run(args, rc=2, module=module)
        _one_line_error(res, f"corrupted checkpoint file {shard}", "--resume_fallback true")


def test_a_fresh_run_does_not_touch_an_earlier_run(tiny, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(str(p) for p in out.rglob("*"))
    res = run(flags("/no/such/model", tiny[1], str(out)), rc=2, module="treepo.cli train")
    _one_line_error(res, f"--output_dir {out} holds another run", "--resume true", "--overwrite true")
    # --overwrite deletes the old run only once the model has loaded: a bad --model keeps it
    res = run(flags("/no/such/model", tiny[1], str(out), overwrite=True), rc=2)
    _one_line_error(res, "/no/such/model")
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_a_run_killed_mid_reward_resumes_to_the_uninterrupted_metrics(tiny, straight, tmp_path):
    """SIGKILL the trainer while its reward worker spins inside step 2's scoring: the worker dies
    with it, and a resume from step 1's checkpoint ends with the uninterrupted run's metrics."""
    import signal
    import time

    out, hang = str(tmp_path / "run"), str(tmp_path / "hang")
    # 4 held-out calls at step 0, 16 per step (4 prompts x 4 leaves): call 25 is mid step 2
    kw = dict(steps=3, save_every=1, reward_fn="trainer_fixtures:even_token_reward_hanging")
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TREEPO_TEST_HANG_FILE=hang, TREEPO_TEST_HANG_AT="25")
    proc = subprocess.Popen([sys.executable, "-m", "treepo.train", *flags(*tiny, out, **kw)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(hang):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the reward function never reached its hanging call"
            time.sleep(0.2)
        worker = int(open(hang).read())
        assert os.path.exists(os.path.join(out, "checkpoints", "step_000001"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for _ in range(100):  # the spinning worker dies with its parent
        if not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError(f"reward worker {worker} outlived its SIGKILLed trainer")
    assert [r["step"] for r in metrics(out) if "actor/pg_loss" in r] == [1]
    run(flags(*tiny, out, **(kw | {"reward_fn": "trainer_fixtures:even_token_reward"}), resume=True))
    recs = [r for r in metrics(out) if "resumed_from" not in r]
    ref = metrics(straight)
    assert [r["step"] for r in recs] == [r["step"] for r in ref]
    for a, b in zip(ref, recs):
        assert sorted(a) == sorted(b)
        for k, v in a.items():
            if not k.startswith(("timing/", "perf/")):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k)
