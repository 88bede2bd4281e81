"""Bad input names itself (issue 12, items 2, 10, 11): the file and line or field, and what would be
valid, before any expensive work; held-out problems are never trained on."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from trainer_fixtures import tiny_checkpoint, write_task

from treepo.engine.loader import load_model
from treepo.engine.tokenizer import load_tokenizer
from treepo.train.data import Problem, jsonl_problems, split_heldout

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


def copy_of(tiny, tmp_path) -> str:
    d = str(tmp_path / "ckpt")
    shutil.copytree(tiny, d)
    return d


# ---------------------------------------------------------------------------- JSONL

@pytest.mark.parametrize("bad,msg", [
    ('{"question": "b", answer: 2}', r"line 3: not valid JSON \(Expecting property name .*: column 19\)"),
    ('[1, 2]', "line 3: expected a JSON object with 'question' and 'answer', got a JSON array"),
    ('"question answer"', "line 3: expected a JSON object .* got a JSON string"),
    ('{"question": 7, "answer": 1}', "line 3: 'question' must be non-empty text, got 7"),
    ('{"question": "q", "answer": null}', "line 3: 'answer' is null"),
    ('{"q": "q", "answer": 1}', r"line 3: needs 'question' and 'answer', has \['answer', 'q'\]"),
])
def test_a_bad_jsonl_line_names_the_file_and_its_line(tmp_path, bad, msg):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n' + bad + '\n{"question": "c", "answer": 3}\n')
    with pytest.raises(ValueError, match=f"{path} {msg}"):
        jsonl_problems(str(path))


def test_jsonl_lines_are_counted_at_newlines_only(tmp_path):
    """A carriage return inside a line (CRLF endings, a stray \\r) does not shift the line numbers."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "a\\r", "answer": 1}\r\n{"question": "b",\r "answer": 2}\r\nnope\r\n')
    with pytest.raises(ValueError, match="line 3: not valid JSON"):
        jsonl_problems(str(path))
    path.write_bytes(b'{"question": "a", "answer": 1}\n{"question": "\xff", "answer": 1}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        jsonl_problems(str(path))


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_an_empty_jsonl_names_its_path(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path} holds no problems"):
        jsonl_problems(str(path))


def test_a_missing_or_directory_jsonl_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"JSONL file {tmp_path}/nope.jsonl does not exist"):
        jsonl_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory"):
        jsonl_problems(str(tmp_path))


# ---------------------------------------------------------------------------- checkpoint files

def edit_config(d, **kw):
    cfg = json.load(open(os.path.join(d, "config.json")))
    for k, v in kw.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))


def truncate(file):
    text = open(file).read()
    open(file, "w").write(text[: len(text) // 2])


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_a_json_error_in_a_checkpoint_file_names_the_file(tiny, tmp_path, name):
    d = copy_of(tiny, tmp_path)
    truncate(os.path.join(d, name))
    load = load_model if name == "config.json" else load_tokenizer
    with pytest.raises(ValueError, match=rf"{d}/{name}: not valid JSON \(.*: line \d+ column \d+\)"):
        load(d)


def test_a_bad_shard_index_names_the_file(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    index = os.path.join(d, "model.safetensors.index.json")
    open(index, "w").write('{"weight_map": {"a": "model.safetensors",}}')
    with pytest.raises(ValueError, match=f"{index}: not valid JSON"):
        load_model(d)
    open(index, "w").write('{"metadata": {}}')
    with pytest.raises(ValueError, match=f'{index}: needs a "weight_map" object'):
        load_model(d)


def test_a_config_json_that_is_not_an_object_names_the_file(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    open(os.path.join(d, "config.json"), "w").write("[1]")
    with pytest.raises(ValueError, match=f"{d}/config.json: expected an object of model settings, got a JSON array"):
        load_model(d)


@pytest.mark.parametrize("edit,msg", [
    (dict(hidden_size=-32), "hidden_size=-32 must be a positive integer"),
    (dict(intermediate_size=-1), "intermediate_size=-1 must be a positive integer"),
    (dict(vocab_size=64.5), "vocab_size=64.5 must be a positive integer"),
    (dict(num_hidden_layers="2"), "num_hidden_layers='2' must be a positive integer"),
    (dict(num_hidden_layers=True), "num_hidden_layers=True must be a positive integer"),
    (dict(num_attention_heads=0), "num_attention_heads=0 must be a positive integer"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 must be a positive integer"),
    (dict(head_dim=-8), "head_dim=-8 must be a positive integer"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0 must be a positive integer"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06 must be a finite number > 0"),
    (dict(rope_parameters={"rope_theta": "big", "rope_type": "default"}), "rope_theta='big' must be a finite"),
    (dict(eos_token_id=[2, -1]), r"eos_token_id=\[2, -1\] must be token ids"),
    (dict(vocab_size=...), "'vocab_size' is missing"),
])
def test_bad_sizes_in_config_json_name_the_file_and_key(tiny, tmp_path, edit, msg):
    """Before: torch's "Trying to create tensor with negative dimension", "empty(): argument 'size'
    ... must be tuple of ints", a KeyError, or a silently odd model."""
    d = copy_of(tiny, tmp_path)
    edit_config(d, **edit)
    with pytest.raises(ValueError, match=f"{d}/config.json: {msg}"):
        load_model(d)


def test_an_integral_rope_theta_still_loads(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    edit_config(d, rope_parameters={"rope_theta": 500000, "rope_type": "default"})
    assert load_model(d).config.rope_theta == 500000.0


# ---------------------------------------------------------------------------- non-finite weights

def damage(d, name, **values):
    from safetensors.torch import load_file, save_file

    file = os.path.join(d, "model.safetensors")
    state = load_file(file)
    for idx, v in values.items():
        state[name].view(-1)[int(idx[1:])] = v
    save_file(state, file, metadata={"format": "pt"})
    return file


def test_nan_weights_are_refused_naming_the_file_and_tensor(tiny, tmp_path):
    """Before: the model loaded and generated logprobs=[nan, ...] without a word."""
    d = copy_of(tiny, tmp_path)
    file = damage(d, "model.layers.1.mlp.up_proj.weight", i3=float("nan"), i7=float("inf"))
    with pytest.raises(ValueError, match=f"{file}: tensor model.layers.1.mlp.up_proj.weight has 2 non-finite "
                                         r"values \(NaN or inf\) of 2048; the weights are damaged"):
        load_model(d)


def test_weights_beyond_the_range_of_the_dtype_asked_for_say_so(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    file = damage(d, "model.norm.weight", i0=1e6)
    with pytest.raises(ValueError, match=f"{file}: tensor model.norm.weight holds values up to 1e\\+06, beyond the "
                                         "range of torch.float16 .*load it in a wider dtype"):
        load_model(d, dtype="float16")
    assert load_model(d, dtype="float32").model.norm.weight[0] == 1e6  # finite where it fits


def test_a_finite_sum_overflow_is_not_mistaken_for_damage():
    from treepo.engine.loader import check_finite

    big = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}  # sum overflows fp16; every value is finite
    check_finite(big, big, {}, "test")


def test_a_transformers_model_with_nan_weights_is_refused():
    from helpers import tiny_hf_model

    from treepo.engine.engine import Engine

    hf = tiny_hf_model("llama_mha_tied")
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="LlamaForCausalLM: tensor model.layers.0.self_attn.q_proj.weight has 1 "
                                         "non-finite"):
        Engine.from_model(hf)


# ---------------------------------------------------------------------------- `treepo train` flags

@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to start loading (process group, tokenizer, weights) fails the test."""
    import treepo.train.trainer as trainer

    def forbidden(*a, **k):
        raise AssertionError("the model started loading before the bad flag was refused")

    for name in ("init_distributed", "load_tokenizer", "load_model"):
        monkeypatch.setattr(trainer, name, forbidden)


@pytest.mark.parametrize("flags,msg", [
    (["--reward_fn", "no_colon"], "expected 'module:function'"),
    (["--reward_fn", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
    (["--reward_fn", "json:no_such_function"], "module 'json' has no function 'no_such_function'"),
    (["--temperature", "-1"], "temperature=-1.0 must be a finite number >= 0"),
    (["--temperature", "nan"], "temperature=nan must be a finite number >= 0"),
    (["--top_p", "0"], r"top_p=0.0 must be in \(0, 1\]"),
    (["--top_p", "1.5"], r"top_p=1.5 must be in \(0, 1\]"),
    (["--top_p", "nan"], r"top_p=nan must be in \(0, 1\]"),
])
def test_bad_train_flags_exit_2_before_the_model_loads(no_model_loading, capsys, flags, msg):
    from treepo.cli import main

    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("treepo train: error: ") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(msg, err), err


# ---------------------------------------------------------------------------- held-out split (item 11)

def problems(questions):
    return [Problem(q, "1", "t") for q in questions]


@pytest.mark.parametrize("n", [3, 4])
def test_a_jsonl_no_longer_than_heldout_size_is_refused(n):
    """Before: the held-out set was the whole training set, silently."""
    with pytest.raises(ValueError, match=f"data.jsonl has {n} problems and heldout_size=4: holding out the last 4 "
                                         "leaves none to train on.*--heldout_size 0"):
        split_heldout(problems(map(str, range(n))), 4, "data.jsonl", last=True)


def test_heldout_size_0_means_no_heldout_set():
    """Before: train[-0:] made the whole file the held-out set."""
    pool = problems("abcde")
    for last in (True, False):
        train, heldout = split_heldout(pool, 0, "data.jsonl", last=last)
        assert train == pool and heldout == []


@pytest.mark.parametrize("h", [-1, 2.0, "2", True])
def test_a_bad_heldout_size_is_refused(h):
    with pytest.raises(ValueError, match="heldout_size=.* must be an integer >= 0"):
        split_heldout(problems("abcde"), h, "data.jsonl", last=True)


def test_jsonl_training_lines_that_repeat_a_heldout_question_are_not_trained_on():
    pool = problems(["a", "b", "c", "a", "d", "a", "d"])
    with pytest.warns(UserWarning, match="data.jsonl: 3 training lines repeat a question of the held-out set"):
        train, heldout = split_heldout(pool, 2, "data.jsonl", last=True)
    assert [p.question for p in heldout] == ["a", "d"] and [p.question for p in train] == ["b", "c"]
    with pytest.raises(ValueError, match="every training problem repeats a question of the held-out set"):
        split_heldout(problems("abab"), 2, "data.jsonl", last=True)


def test_a_generated_pool_holds_out_distinct_questions_the_stream_never_shows():
    pool = problems([f"q{i % 10}" for i in range(100)])
    train, heldout = split_heldout(pool, 4, "gym", seed=3)
    held = [p.question for p in heldout]
    assert len(held) == len(set(held)) == 4
    assert not set(held) & {p.question for p in train}
    assert len(train) == 60 and len({p.question for p in train}) == 6
    assert [p.question for p in split_heldout(pool, 4, "gym", seed=3)[1]] == held  # seeded: same on every rank
    with pytest.raises(ValueError, match="gym yields 10 distinct questions in 100 problems and heldout_size=10: "
                                         "a held-out set disjoint from training needs more than 10"):
        split_heldout(pool, 10, "gym")


def trainer_datasets(**fields):
    from treepo.train.config import TrainConfig
    from treepo.train.trainer import Trainer

    t = Trainer.__new__(Trainer)  # only the data: no model
    t.cfg, t.rank = TrainConfig(**fields), 0
    return t._datasets()


def test_the_default_run_evaluates_on_questions_it_never_trains_on(capsys):
    """Before: the 64 default held-out problems (another seed) were all among the 121 distinct training
    questions, and the code silently used them anyway."""
    train, heldout = trainer_datasets()
    seen = {p.question for p in train}
    assert len(heldout) == len({p.question for p in heldout}) == 64
    assert not seen & {p.question for p in heldout}
    assert len(seen) == 121 - 64 and all(p.gym_entry for p in heldout)
    assert "data: 2384 training problems (57 distinct questions), 64 held-out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--train_task basic_arithmetic with its --train_task_config yields 121 "
                                         "distinct questions"):
        trainer_datasets(heldout_size=121)


def test_trainer_jsonl_split(tmp_path):
    task = write_task(str(tmp_path / "task.jsonl"), n=10)
    train, heldout = trainer_datasets(train_jsonl=task, heldout_size=4)
    assert [p.meta["line"] for p in train] == list(range(1, 7)) and [p.meta["line"] for p in heldout] == [7, 8, 9, 10]
    with pytest.raises(ValueError, match=f"{task} has 10 problems and heldout_size=10"):
        trainer_datasets(train_jsonl=task, heldout_size=10)


def test_treepo_train_refuses_a_short_jsonl_with_exit_2(tiny, tmp_path):
    task = write_task(str(tmp_path / "short.jsonl"), n=3)
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "treepo.cli", "train", "--model", tiny, "--train_jsonl", task,
                          "--heldout_size", "4", "--output_dir", str(tmp_path / "out"), "--eval_gsm8k", "false"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip() == (f"treepo train: error: {task} has 3 problems and heldout_size=4: holding out the "
                                  "last 4 leaves none to train on; give more than 4 problems, use a smaller "
                                  "--heldout_size, or --heldout_size 0 for no held-out evaluation")
