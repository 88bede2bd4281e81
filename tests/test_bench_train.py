"""bench/bench_train.py's aggregation on hand-made metrics records: step means without the warm-up
step, derived columns against hand-computed values, n/a for metrics a run lacks, failed runs."""
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_train as bt  # noqa: E402


def _recs(step, old, update, unique=None, leaf=None, mem=None):
    """Three step records; the first (warm-up) is 10x slower and must not count."""
    out = [{"step": 0, "heldout/mean@1": 0.1}]  # an eval record: no timing, ignored
    for i, scale in enumerate((10, 1, 1)):
        r = {"step": i + 1, "timing/step": step * scale, "timing/old_log_prob": old * scale,
             "timing/update": update * scale, "timing/gen": 1.0}
        if unique is not None:
            r |= {"packing/unique_tokens": unique, "packing/leaf_tokens": leaf, "packing/ideal_ratio": leaf / unique,
                  "packing/forward_tokens": unique, "packing/padded_tokens": 1000}  # `unique`: what the run computes
        if mem is not None:
            r["perf/update_peak_mem_gb"] = mem
        out.append(r)
    out.append({"step": 3, "final": True})
    return out


def _row(mode, packing, rss, recs):
    return {"mode": mode, "packing": packing, "peak_rss_gb": rss} | bt.mean_metrics(recs)


def test_mean_metrics_drops_the_warm_up_step_and_marks_missing_metrics():
    m = bt.mean_metrics(_recs(step=20.0, old=4.0, update=12.0))
    assert m["step"] == 20.0 and m["old_log_prob"] == 4.0 and m["update"] == 12.0
    assert m["unique_tokens"] is None and m["update_peak_mem_gb"] is None
    assert bt.mean_metrics(_recs(5.0, 1.0, 2.0)[:2])["step"] == 50.0  # a single step is kept


def test_summarize_and_targets_hand_computed():
    rows = bt.summarize([
        _row("sequential", "none", 4.0, _recs(100.0, 20.0, 60.0, unique=1000, leaf=800, mem=2.0)),
        _row("tree", "none", 4.0, _recs(90.0, 20.0, 60.0, unique=1000, leaf=800, mem=2.0)),
        _row("tree", "tree", 3.0, _recs(50.0, 0.0, 20.0, unique=200, leaf=800, mem=0.8)),
        _row("tree", "prompt", 3.5, _recs(70.0, 0.0, 40.0, unique=400, leaf=800)),  # no memory metric
    ])
    base, tnone, tt, tp = rows
    assert base["train_s"] == 80.0 and base["speedup"] == 1.0 and base["of_ideal"] == 1.0 and base["ideal"] == 1.0
    assert base["step_less"] == 0.0 and base["rss_rel"] == 1.0 and base["mem_rel"] == 1.0
    assert tnone["step_less"] == pytest.approx(0.1)
    assert tt["train_s"] == 20.0 and tt["speedup"] == 4.0  # vs tree + none (80 s)
    assert tt["ideal"] == 4.0 and tt["of_ideal"] == 1.0 and tt["tok_ratio"] == 5.0
    assert tt["step_less"] == pytest.approx(0.5) and tt["rss_rel"] == 0.75 and tt["mem_rel"] == pytest.approx(0.4)
    assert tp["speedup"] == 2.0 and tp["ideal"] == 2.0 and tp["mem_rel"] is None
    lines = bt.targets(rows)
    assert lines[0].endswith("100% PASS") and lines[1].startswith("target tree+prompt")
    assert lines[2].endswith("50% PASS")
    assert "0.40x PASS; peak RSS 0.75x" in lines[3]


def test_old_trainer_runs_and_failures_give_na_not_errors():
    rows = bt.summarize([
        _row("sequential", "default", 4.0, _recs(100.0, 20.0, 60.0)),  # no packing/* metrics at all
        _row("tree", "default", 4.0, _recs(80.0, 20.0, 40.0)),
        {"mode": "tree", "packing": "tree", "peak_rss_gb": 0.2, "exit": 2, "error": "exit 2: unknown --packing"},
    ])
    assert rows[1]["step_less"] == pytest.approx(0.2) and rows[1]["speedup"] == 1.0
    assert rows[2].get("speedup") is None
    lines = bt.targets(rows)
    assert lines == ["target tree+tree: training phases reach >= 80% of the ideal ratio: n/a",
                     "target tree+tree: step time >= 40% less than the baseline (sequential+none): n/a",
                     "target tree+tree: update peak memory <= half of the baseline's: n/a"]


def test_train_cmd_omits_flags_left_unset():
    args = SimpleNamespace(split="4x32", steps=2, prompts=4, leaves=8, seed=1, micro_batch_tokens=None,
                           autocast="off", engine_dtype=None)
    cmd = bt.train_cmd("tree", "default", args, "/tmp/x")
    assert "--packing" not in cmd and "--micro_batch_tokens" not in cmd and "--engine_dtype" not in cmd
    assert cmd[cmd.index("--autocast") + 1] == "off" and cmd[cmd.index("--max_response_len") + 1] == "128"
    cmd = bt.train_cmd("sequential", "prompt", args, "/tmp/x")
    assert cmd[cmd.index("--packing") + 1] == "prompt"
