"""bench/bench_learning.py: its reading of metrics records on hand-made ones (cumulative compute,
trainer passes, seeds' mean and spread, interpolated targets), and a tiny-model smoke run of all
three arms (two steps each, the real `python -m treepo.train` subprocesses) whose recorded
compute must equal the sums of the runs' own counters, read here independently."""
import json
import os
import sys

import pytest
from trainer_fixtures import tiny_checkpoint, write_task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_learning as bl  # noqa: E402

HERE = os.path.dirname(__file__)
PNG = b"\x89PNG\r\n\x1a\n"


def _step(step, tokens, forward, wall, **kw):
    return {"step": step, "sampling/tokens_processed": tokens, "packing/forward_tokens": forward,
            "timing/step": wall, "timing/gen": wall / 2, "timing/update": wall / 4, **kw}


def _eval(step, mean, final=False):
    rec = {"step": step, "eval/heldout/mean@n": mean, "eval/heldout/maj@n": mean / 2, "eval/heldout/pass@1": mean,
           "eval/heldout/pass@4": min(1.0, 2 * mean)}
    return rec | ({"final": True} if final else {})


def test_curve_sums_compute_up_to_each_evaluation_and_counts_trainer_passes():
    recs = [_eval(0, 0.1), _step(1, 100, 50, 10.0), _step(2, 80, 40, 8.0) | _eval(2, 0.3),
            {"resumed_from": "x", "step": 2}, _step(3, 60, 30, 6.0), _eval(3, 0.4, final=True)]
    pts, checks = bl.curve(recs, {"eval_n": 4, "mini_batches": 1, "kl_coef": 0.0})
    assert [p["step"] for p in pts] == [0, 2, 3]
    assert [p["sampling_tokens"] for p in pts] == [0, 180, 240]
    assert [p["trainer_tokens"] for p in pts] == [0, 90, 120]  # one pass: the update
    assert [p["tokens"] for p in pts] == [0, 270, 360]
    assert [p["wall_s"] for p in pts] == [0, 18.0, 24.0] and pts[2]["gen_s"] == 12.0 and pts[2]["old_log_prob_s"] == 0
    assert pts[1]["maj@n"] == 0.15 and pts[1]["pass@n"] == 0.6
    assert checks == {"sampling_tokens": 240, "engine_tokens": None, "trainer_tokens": 120, "tokens_computed": None}
    # several mini-batches add the old-log-prob forward, KL the reference forward
    pts, _ = bl.curve(recs, {"eval_n": 4, "mini_batches": 2, "kl_coef": 0.1})
    assert pts[-1]["trainer_tokens"] == 3 * 120


def _run(arm, seed, means, wall_per_step, tok_per_step):
    recs = [_eval(0, means[0])]
    for s, m in enumerate(means[1:], 1):
        recs += [_step(s, tok_per_step, tok_per_step, wall_per_step) | _eval(s, m)]
    recs[-1]["final"] = True
    pts, checks = bl.curve(recs, {"eval_n": 4})
    return {"name": f"{arm}_s{seed}", "arm": arm, "seed": seed, "points": pts, "checks": checks}


def test_aggregate_and_targets_hand_computed():
    runs = [_run("dapo", 0, [0.1, 0.2, 0.4], 10.0, 100), _run("dapo", 1, [0.1, 0.3, 0.4], 10.0, 100),
            _run("treepo", 0, [0.1, 0.5, 0.6], 5.0, 50), _run("treepo", 1, [0.1, 0.3, 0.4], 5.0, 50),
            _run("tree_grpo", 0, [0.1, 0.2, 0.3], 5.0, 50)]
    agg = bl.aggregate(runs)
    d = agg["dapo"]
    assert [p["mean@n"] for p in d] == pytest.approx([0.1, 0.25, 0.4])
    assert (d[1]["mean@n_min"], d[1]["mean@n_max"], d[1]["seeds"]) == (0.2, 0.3, 2)
    assert d[-1]["wall_s"] == 20.0 and d[-1]["tokens"] == 400
    t = agg["treepo"]
    assert [p["mean@n"] for p in t] == pytest.approx([0.1, 0.4, 0.5])
    # treepo's mean curve reaches dapo's final 0.4 at step 1: 5 s of dapo's 20 s, 100 of its 400 tokens
    assert bl.reach(t, "mean@n", 0.4, "wall_s") == pytest.approx(5.0)
    assert bl.reach(t, "mean@n", 0.25, "wall_s") == pytest.approx(2.5)  # halfway from 0.1 to 0.4
    assert bl.reach(t, "mean@n", 0.1, "tokens") == 0  # already there at the start
    assert bl.reach(t, "mean@n", 0.9, "tokens") is None
    lines, figs = bl.targets(agg, "mean@n")
    assert figs["treepo"]["fraction_of_baseline"]["wall_s"] == pytest.approx(0.25)
    assert figs["treepo"]["fraction_of_baseline"]["tokens"] == pytest.approx(0.25)
    assert lines[0] == ("target treepo reaches dapo's final mean@n 0.400 with <= 60% of its compute: wall 0.25 PASS, "
                        "tokens 0.25 PASS (sampling 0.25, trainer 0.25)")
    assert lines[1] == "target treepo does not end below dapo: final mean@n 0.500 vs 0.400 PASS"
    assert lines[2].startswith("info tree_grpo") and lines[2].endswith("wall never FAIL, tokens never FAIL "
                                                                        "(sampling never, trainer never)")
    assert lines[3].endswith("final mean@n 0.300 vs 0.400 FAIL")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("learn")
    return tiny_checkpoint(str(d / "model")), write_task(str(d / "task.jsonl"))


def _argv(tiny, out, *more):
    model, task = tiny
    return ["--out", out, "--seeds", "0", "--steps", "2", "--prompts_per_step", "4", "--leaves", "4",
            "--segment_len", "4", "--max_depth", "3", "--max_response_len", "12", "--eval_every", "1",
            "--heldout_size", "4", "--eval_n", "2", "--eval_max_tokens", "4",
            "--model", model, "--train_jsonl", task, "--engine_dtype", "float32", "--lr", "3e-3",
            "--warmup_steps", "1", "--reward_fn", "trainer_fixtures:even_token_reward", "--micro_batch_tokens", "64",
            "--mini_batches", "2", *more]  # two mini-batches: the old-log-prob pass runs and counts


def _records(path):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def test_smoke_three_arms_compute_adds_up(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))  # the reward_fn
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "cmp")
    assert bl.main(_argv(tiny, out)) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "learning" and last["failed"] == [] and set(last["aggregate"]) == set(bl.ARMS)
    saved = json.load(open(os.path.join(out, "learning.json")))
    configs = {}
    for run in saved["runs"]:
        d = run["dir"]
        configs[run["arm"]] = json.load(open(os.path.join(d, "config.json")))
        steps = [r for r in _records(d) if "timing/step" in r]
        assert [r["step"] for r in steps] == [1, 2]
        assert [p["step"] for p in run["points"]] == [0, 1, 2]
        start, mid, end = run["points"]
        assert start["tokens"] == start["wall_s"] == 0
        for p, upto in ((mid, steps[:1]), (end, steps)):  # cumulative over the steps up to the evaluation
            sampled = sum(r["sampling/tokens_processed"] for r in upto)
            assert p["sampling_tokens"] == sampled == sum(r["sampling/engine_tokens"] for r in upto) > 0
            assert p["trainer_tokens"] == 2 * sum(r["packing/forward_tokens"] for r in upto)
            assert p["trainer_tokens"] == sum(r["packing/tokens_computed"] for r in upto) > 0
            assert p["wall_s"] == pytest.approx(sum(r["timing/step"] for r in upto))
            assert p["gen_s"] == pytest.approx(sum(r["timing/gen"] for r in upto))
            assert p["old_log_prob_s"] == pytest.approx(sum(r["timing/old_log_prob"] for r in upto))
        final = next(r for r in _records(d) if r.get("final"))
        assert end["mean@n"] == final["eval/heldout/mean@n"] and end["pass@n"] == final["eval/heldout/pass@2"]
        assert not os.path.exists(os.path.join(d, "checkpoints"))  # deleted without --keep_checkpoints
    assert not any("MISMATCH" in c for c in saved["checks"]) and len(saved["checks"]) == 6
    # the arms differ only in sampling mode and advantage
    for arm, cfg in configs.items():
        assert (cfg["mode"], cfg["advantage"]) == (bl.ARMS[arm]["mode"], bl.ARMS[arm]["advantage"])
        diff = {k for k in cfg if k != "output_dir" and cfg[k] != configs["treepo"][k]}
        assert diff <= {"mode", "advantage"}, (arm, diff)
    md = open(os.path.join(out, "learning.md")).read()
    assert "## dapo (sequential sampling, grpo advantage)" in md and "target treepo reaches dapo's final" in md
    for png in ("accuracy_vs_wall.png", "accuracy_vs_tokens.png"):
        assert open(os.path.join(out, png), "rb").read(8) == PNG

    # existing runs: refused without --resume; kept with it; redone from the files with --plot-only
    with pytest.raises(SystemExit, match=f"{out}/treepo_s0 holds a run"):
        bl.main(_argv(tiny, out))
    capsys.readouterr()
    assert bl.main(_argv(tiny, out, "--resume")) == 0
    text = capsys.readouterr().out
    assert text.count("finished earlier, kept (--resume)") == 3
    assert json.loads(text.strip().splitlines()[-1])["aggregate"] == last["aggregate"]
    os.remove(os.path.join(out, "learning.json"))
    assert bl.main(["--out", out, "--plot-only"]) == 0
    assert json.load(open(os.path.join(out, "learning.json")))["aggregate"] == saved["aggregate"]
    # an unfinished run is restarted under --resume; a finished one of another configuration is refused
    d = os.path.join(out, "dapo_s0")
    recs = _records(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs if not r.get("final"))
    actions = {r["name"]: r["action"] for r in bl.plan(bl.parse_args(_argv(tiny, out, "--resume")))}
    assert actions == {"treepo_s0": "skip", "dapo_s0": "restart", "tree_grpo_s0": "skip"}
    with pytest.raises(SystemExit, match=f"{out}/treepo_s0 holds a finished run of another configuration "
                                         r"\(differs in lr\)"):
        bl.plan(bl.parse_args(_argv(tiny, out, "--resume", "--lr", "1e-3")))


def test_flags_the_bench_sets_per_run_are_refused():
    with pytest.raises(SystemExit, match="--mode: set per run"):
        bl.parse_args(["--mode", "tree"])
    with pytest.raises(SystemExit, match="--arms 'treepo,ppo'"):
        bl.parse_args(["--arms", "treepo,ppo"])
    with pytest.raises(SystemExit, match="--plot-only: no run directories"):
        bl.main(["--out", HERE, "--plot-only"])
