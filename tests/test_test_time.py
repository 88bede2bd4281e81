"""Test-time search (treepo/train/test_time.py, bench/bench_test_time.py) on a tiny random model:
the spelling of samplers, compute equal to the engine's counter deltas and to the trees' own
stats, metrics equal to hand-scored samples for both samplers, and a two-point sweep that writes
its table, JSON and PNGs."""
import json
import os
import sys

import pytest
from trainer_fixtures import even_token_reward, tiny_checkpoint, write_task

from treepo.rollout.tree import TreeConfig
from treepo.train.test_time import parse_search

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_test_time as btt  # noqa: E402

REWARD = "trainer_fixtures:even_token_reward"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tt")
    return tiny_checkpoint(str(d / "model")), write_task(str(d / "task.jsonl"), n=12)


@pytest.fixture(scope="module")
def engine(tiny):
    from treepo import Engine

    return Engine.from_pretrained(tiny[0], dtype="float32")


def test_spellings():
    s = parse_search("seq:8", 128)
    assert (s.n, s.tree) == (8, None)
    t = parse_search("tree:w16:4x32:b2", 256).tree
    assert (t.max_width, t.max_depth, t.segment_len, t.branch_factor, t.max_response_len) == (16, 4, 32, 2, 128)
    t = parse_search("tree:b4:d3:w8:r2-6", 100).tree  # any order; d3 splits the budget: ceil(100 / 3)
    assert (t.segment_len, t.max_depth, t.branch_factor, t.max_response_len) == (34, 3, 4, 100)
    assert (t.init_divergence, t.init_min, t.init_max) == ("random", 2, 6)
    assert parse_search("tree:w8:d4", 128).tree.branch_factor == 2  # default b
    for bad, needle in [("seq:0", "seq:N"), ("seq", "seq:N"), ("beam:4", "unknown kind 'beam'"),
                        ("tree:w8", "needs the width"), ("tree:w8:4x32:q3", "cannot read the part 'q3'"),
                        ("tree:w8:w4:d4", "'w4' repeats"), ("tree:w8:d4:r6-2", "init_min=6 > init_max=2")]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as e:
            parse_search(bad, 128)
        assert bad in str(e.value)
        assert ("tree:wW:DxL:bB" in str(e.value)) == ("init_min" not in needle)  # TreeConfig's own errors


def test_compute_is_the_engines_and_metrics_are_the_samples(tiny, engine):
    """evaluate_search's tokens are the engine's counter deltas (and, for a tree, the trees' own
    processed tokens); its metrics equal hand-scoring the very samples each sampler draws."""
    from treepo import SamplingParams
    from treepo.rollout.sampler import TreeSampler
    from treepo.train.data import jsonl_problems, render_prompt
    from treepo.train.evaluate import evaluate
    from treepo.train.rewards.problems import ProblemScorer
    from treepo.train.test_time import evaluate_search

    probs = jsonl_problems(tiny[1])[:3]
    scorer = ProblemScorer(REWARD)
    prompts = [render_prompt(engine.tokenizer, p.question) for p in probs]

    def hand_mean(samples_per_problem):
        accs = [[float(even_token_reward(None, {"response_ids": ids}) > 0) for ids in s] for s in samples_per_problem]
        return sum(sum(a) / len(a) for a in accs) / len(accs)

    for spec in ("seq:3", "tree:w4:3x3:b2"):
        search = parse_search(spec, 9)
        c0 = engine.counters()
        res = evaluate_search(engine, probs, scorer, search, temperature=1.0, max_tokens=9, seed=5)
        c1 = engine.counters()
        comp = res["compute"]
        assert comp["tokens"] == (c1["prefill_tokens"] + c1["decode_tokens"]) - (c0["prefill_tokens"]
                                                                                  + c0["decode_tokens"])
        assert comp["forward_passes"] == c1["forward_passes"] - c0["forward_passes"] > 0
        assert comp["prefill_tokens"] + comp["decode_tokens"] == comp["tokens"]
        assert comp["wall_s"] >= comp["sample_s"] > 0
        o = res["metrics"]["overall"]
        assert all(0.0 <= o[k] <= 1.0 for k in ("mean@n", "maj@n", "pass@1", f"pass@{search.n}"))
        if search.tree is None:
            assert comp["samples"] == 3 * 3 and "tree_tokens" not in comp
            outs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=9, seed=5))
            samples = [[c.token_ids for c in cs] for cs in outs]
            # the best-of-N path is the trainer's evaluate(), unchanged
            assert evaluate(engine, probs, scorer, n=3, temperature=1.0, max_tokens=9, seed=5) == res["metrics"]
        else:
            assert comp["tree_tokens"] == comp["tokens"]  # the trees' stats account for every engine token
            cfg = TreeConfig(segment_len=3, max_depth=3, max_width=4, branch_factor=2, max_response_len=9, seed=5)
            trees = TreeSampler(engine, cfg).sample(prompts, SamplingParams(temperature=1.0, max_tokens=9, seed=5))
            samples = [[lf.token_ids for lf in t.leaves] for t in trees]
            assert comp["samples"] == sum(len(s) for s in samples)
            # evaluate() with the tree as its sampler scores the same leaves
            again = evaluate(engine, probs, scorer, temperature=1.0, seed=5, sampler=cfg)
            assert again == res["metrics"]
        assert comp["response_tokens"] == sum(len(ids) for s in samples for ids in s)
        assert o["mean@n"] == pytest.approx(hand_mean(samples))
        assert 0 < hand_mean(samples) < 1  # the reward tells samples apart: the check above means something


def test_two_point_sweep_writes_table_json_and_pngs(tiny, tmp_path, capsys):
    model, task = tiny
    out = tmp_path / "sweep"
    payload = btt.main(["--model", model, "--train_jsonl", task, "--heldout_size", "4", "--problems", "3",
                        "--datasets", "heldout", "--shapes", "seq:2,tree:w4:d2:b2", "--max_tokens", "8",
                        "--temperature", "1.0", "--seeds", "0,1", "--reward_fn", REWARD, "--engine_dtype", "float32",
                        "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last["bench"] == "test_time" and len(last["rows"]) == 4 and len(last["aggregate"]) == 2
    assert any(ln.lstrip().startswith("seq:2") for ln in lines) and any("tree:w4:d2:b2" in ln for ln in lines)
    assert last["targets"][0].startswith("target heldout: a tree reaches seq:2's maj@n")
    for r in payload["rows"]:
        assert r["problems"] == 3 and r["tokens"] == r["prefill_tokens"] + r["decode_tokens"] > 0
        assert all(0.0 <= r[k] <= 1.0 for k in ("mean@n", "maj@n", "pass@1", "pass@n"))
    for a in payload["aggregate"]:  # the mean over the two seeds' rows
        mine = [r for r in payload["rows"] if r["shape"] == a["shape"]]
        assert a["tokens"] == pytest.approx(sum(r["tokens"] for r in mine) / 2)
        assert a["maj_min"] <= a["maj@n"] <= a["maj_max"]
    saved = json.load(open(out / "test_time.json"))
    assert saved["rows"] == payload["rows"]
    md = (out / "test_time.md").read_text()
    assert "| seq:2 |" in md and "| tree:w4:d2:b2 |" in md
    for png in ("test_time_vs_tokens.png", "test_time_vs_wall.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_shapes_stop_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="--shapes: sampler 'tree:w4'"):
        btt.main(["--model", "/no/such/model", "--shapes", "seq:2,tree:w4", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--datasets 'mmlu'"):
        btt.main(["--datasets", "mmlu"])


def test_run_dir_gives_the_runs_own_heldout_set(tiny, tmp_path):
    """--run: the held-out problems are those the run's config gives the trainer."""
    import dataclasses

    from treepo.train.config import TrainConfig
    from treepo.train.data import train_and_heldout

    cfg = TrainConfig(train_jsonl=tiny[1], heldout_size=5, seed=3, resume=True)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    args = btt.parse_args(["--run", str(tmp_path), "--problems", "4"])
    got = btt.problems(args, "heldout")
    assert [p.question for p in got] == [p.question for p in train_and_heldout(cfg)[1][:4]]
    assert [p.question for p in got] == [f"Say anything {i}." for i in range(7, 11)]  # the file's last 5, first 4
    with pytest.raises(SystemExit, match="give --model or --run"):
        btt.parse_args(["--run", str(tmp_path), "--model", "x"])
