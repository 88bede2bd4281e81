"""TrainConfig and its flags: presets under explicit values, strict booleans, numeric checks,
reward function specs, and the typed rollout's alignment checks (no model needed)."""
import json
import re

import pytest

from treepo.train.config import PRESETS, TrainConfig, parse_args


def test_preset_values_are_defaults_that_explicit_flags_override():
    assert parse_args(["--preset", "quick"]).steps == PRESETS["quick"]["steps"] == 6
    # 15 is also the plain default: an explicit flag equal to the default must still win
    assert TrainConfig().steps == 15
    cfg = parse_args(["--preset", "quick", "--steps", "15", "--eval_gsm8k", "true"])
    assert cfg.steps == 15 and cfg.eval_gsm8k is True and cfg.preset == "quick"
    assert cfg.leaves == PRESETS["quick"]["leaves"]  # the rest of the preset still applies
    assert TrainConfig.from_preset("quick", steps=15).steps == 15


def test_config_file_overrides_preset_and_flags_override_file(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"preset": "quick", "steps": 15, "leaves": 8}))
    cfg = parse_args(["--config", str(f), "--leaves", "6"])
    assert (cfg.preset, cfg.steps, cfg.leaves, cfg.segment_len) == ("quick", 15, 6, PRESETS["quick"]["segment_len"])


def test_config_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        parse_args(["--config", str(f)])
    with pytest.raises(ValueError, match="unknown config fields.*'stepz'"):
        parse_args(["--config", str(_write(tmp_path / "u.json", {"stepz": 3}))])


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("word,value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                        ("false", False), ("0", False), ("NO", False)])
def test_booleans_parse_strictly(word, value):
    assert parse_args(["--resume", word]).resume is value


@pytest.mark.parametrize("word", ["y", "maybe", "on", ""])
def test_unknown_boolean_is_an_error_naming_the_choices(word, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--resume", word])
    err = capsys.readouterr().err
    assert "--resume" in err and "not a boolean" in err and "true" in err and "false" in err


@pytest.mark.parametrize("flag,value", [("lr", "inf"), ("lr", "nan"), ("lr", "-1"), ("grad_clip", "inf"),
                                        ("temperature", "-0.5"), ("top_p", "0"), ("top_p", "1.5")])
def test_non_finite_or_out_of_range_numbers_are_refused(flag, value):
    with pytest.raises(ValueError, match=flag):
        parse_args([f"--{flag}", value])


def test_bad_preset_and_mode_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid: default, quick"):
        parse_args(["--preset", "fast"])
    with pytest.raises(ValueError, match="valid: tree, sequential"):
        TrainConfig(mode="trees")


@pytest.mark.parametrize("flags,msg", [
    (["--packing", "leaf"], "packing='leaf'; valid: tree, prompt, none"),
    (["--autocast", "fp16"], "autocast='fp16'; valid: auto, bf16, off"),
    (["--engine_dtype", "half"], "engine_dtype='half'; valid: auto, bfloat16, float32"),
    (["--micro_batch_tokens", "0"], "micro_batch_tokens=0 must be >= 1"),
    (["--attention", "flash"], "attention='flash'; valid: auto, triton, gathered, per_tree, dense, per_tree_bf16, "
                               "flex"),
])
def test_packing_and_precision_flags_name_the_valid_values(flags, msg):
    """Refused when the config is built, before any data or model is looked at."""
    with pytest.raises(ValueError, match=re.escape(msg)):
        parse_args(flags)


@pytest.mark.parametrize("spec,msg", [("no_colon", "expected 'module:function'"),
                                      ("no_such_module_xyz:fn", "cannot import module"),
                                      ("json:no_such_function", "has no function"), (":fn", "expected")])
def test_bad_reward_fn_is_a_clear_error(spec, msg):
    from treepo.train.rewards.problems import ProblemScorer

    with pytest.raises(ValueError, match=msg):
        ProblemScorer(spec)


def test_scored_tree_refuses_rewards_that_do_not_match_its_leaves():
    from treepo.rollout.tree import Leaf, Node, Tree, TreeStats
    from treepo.train.data import Problem
    from treepo.train.rollout import Rollout, RolloutStats, ScoredTree

    leaves = [Leaf([1, 2], [0.0, 0.0], [1], "eos"), Leaf([3], [0.0], [2], "eos")]
    tree = Tree([5, 6], [Node(0, None, 0)], leaves, TreeStats())
    p = Problem("q", "a", "src")
    with pytest.raises(ValueError, match="2 leaves but 1 rewards"):
        ScoredTree(p, tree, [1.0], [1.0, 0.0])
    r = Rollout([ScoredTree(p, tree, [1.0, -1.0], [1.0, 0.0]), ScoredTree(p, tree, [0.5, 0.25], [1.0, 1.0])],
                RolloutStats())
    assert r.rewards().tolist() == [1.0, -1.0, 0.5, 0.25]  # trees_to_batch row order
