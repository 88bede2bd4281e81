"""The command line (issue 15, items 1, 4, 5): every subcommand and flag is in --help with its doc,
default and valid values, read from the config's field comments; both spellings of a flag; boolean
flags; `treepo sample`'s dtype choice and its first line; scripts/main.sh keeps the caller's
directory."""
import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest
from trainer_fixtures import tiny_checkpoint

import treepo.train.precision as precision
from treepo.cli import build_parser, main, sample_device, sample_dtype
from treepo.flags import field_docs
from treepo.train.config import CHOICES, PRESETS, TrainConfig, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_of(argv, capsys, monkeypatch) -> str:
    """--help's output unwrapped (argparse wraps to $COLUMNS, breaking at hyphens), whitespace collapsed."""
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------- help (item 1)

def test_treepo_help_lists_every_subcommand(capsys, monkeypatch):
    out = help_of(["--help"], capsys, monkeypatch)
    assert "{train,sample,eval,info}" in out
    for cmd, text in [("train", "TreePO RL training"), ("sample", "sample completions"), ("eval", "accuracy"),
                      ("info", "versions")]:
        assert re.search(rf"\b{cmd} {text}", out), (cmd, out)


def test_train_help_shows_doc_default_valid_values_and_preset_values(capsys, monkeypatch):
    out = help_of(["train", "--help"], capsys, monkeypatch)
    assert ('--packing NAME what one training forward computes (docs/training.md section 10): "tree" every unique '
            'token of a tree once, "prompt" only the prompt shared, "none" one padded row per leaf '
            '(default: tree; valid: tree, prompt, none)') in out
    assert ("--segment_len INT, --segment-len INT l: tokens per tree segment (one decoding round before branching) "
            "(default: 32; --preset quick: 16)") in out
    assert "--resume [BOOL] continue the run in output_dir" in out and "(default: false)" in out
    assert '--betas JSON AdamW (JSON list) (default: [0.9, 0.999])' in out


def test_every_train_field_is_a_flag_with_its_comment(capsys, monkeypatch):
    """The field comments are the one source of the help: none is missing, each is shown."""
    out = help_of(["train", "--help"], capsys, monkeypatch)
    docs = field_docs(TrainConfig)
    assert list(docs) == [f.name for f in dataclasses.fields(TrainConfig)]
    for name, doc in docs.items():
        assert doc, f"TrainConfig.{name} has no comment"
        assert f"--{name} " in out and " ".join(doc.split()) in out, name
    for name, valid in CHOICES.items():
        assert f"valid: {', '.join(valid)})" in out, name
    # a two-line comment is one doc; a section heading after a blank line belongs to no field
    assert docs["resume_fallback"].endswith("instead of stopping with an error that names the damaged file")
    assert docs["eval_gsm8k"] == "also evaluate on the 100 real GSM8K test problems (before and after)"


@dataclass
class _Example:
    a: int = 1  # first
    # continued
    b: str = "x"

    # heading
    c: dict = dataclasses.field(default_factory=dict)  # on the first line
    d: str = "# not a comment"  # last


def test_field_docs_convention():
    assert field_docs(_Example) == {"a": "first continued", "b": "", "c": "on the first line",
                                    "d": "last"}


# ---------------------------------------------------------------------------- spellings and booleans (item 1)

def test_dash_and_underscore_spellings_give_the_same_config():
    under = ["--segment_len", "16", "--max_response_len", "0", "--micro_batch_tokens", "512", "--eval_gsm8k", "false",
             "--train_task_config", '{"min_terms": 3}', "--engine_dtype", "float32", "--resume_fallback", "--resume"]
    dash = [a.replace("_", "-") if a.startswith("--") else a for a in under]
    assert dash[:2] == ["--segment-len", "16"]
    cfg = parse_args(dash)
    assert cfg == parse_args(under)
    assert (cfg.segment_len, cfg.max_response_len, cfg.micro_batch_tokens, cfg.eval_gsm8k) == (16, 64, 512, False)
    assert cfg.train_task_config == {"min_terms": 3} and cfg.resume_fallback and cfg.resume


def test_sample_takes_both_spellings():
    ap = build_parser()
    dash = ap.parse_args(["sample", "--max-tokens", "5", "--top-p", "0.5", "--top-k", "3", "--segment-len", "8"])
    under = ap.parse_args(["sample", "--max_tokens", "5", "--top_p", "0.5", "--top_k", "3", "--segment_len", "8"])
    assert vars(dash) == vars(under)
    assert (dash.max_tokens, dash.top_p, dash.top_k, dash.segment_len) == (5, 0.5, 3, 8)


@pytest.mark.parametrize("argv,value", [
    ([], False), (["--resume"], True), (["--resume", "true"], True), (["--resume", "false"], False),
    (["--resume", "--steps", "3"], True), (["--no-resume"], False), (["--no_resume"], False),
    (["--resume", "--no-resume"], False),  # the last one wins
])
def test_boolean_flags(argv, value):
    assert parse_args(argv).resume is value


def test_negated_boolean_over_a_true_default_and_a_preset():
    assert TrainConfig().eval_gsm8k is True
    assert parse_args(["--no-eval-gsm8k"]).eval_gsm8k is False
    assert parse_args(["--preset", "quick", "--eval-gsm8k"]).eval_gsm8k is True  # the preset says false
    assert parse_args(["--preset", "quick"]).eval_gsm8k is PRESETS["quick"]["eval_gsm8k"] is False


def test_negated_boolean_takes_no_value(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--no-resume", "true"])
    assert "unrecognized arguments: true" in capsys.readouterr().err


@pytest.mark.parametrize("flags,msg", [
    (["--packing", "leaf"], "packing='leaf'; valid: tree, prompt, none"),
    (["--kl-type", "k2"], "kl_type='k2'; valid: k1, k3"),
    (["--aggregation", "sum"], "aggregation='sum'; valid: average, size_weighted"),
])
def test_a_bad_value_names_the_valid_ones(flags, msg, capsys):
    with pytest.raises(ValueError, match=re.escape(msg)):
        parse_args(flags)
    assert main(["train", *flags]) == 2  # refused before any data or model is looked at
    assert capsys.readouterr().err == f"treepo train: error: {msg}\n"


# ---------------------------------------------------------------------------- sample dtype (item 5)

@pytest.mark.parametrize("fast,expected", [
    (True, ("bfloat16", "auto: CPU has AVX512-BF16/AMX-BF16")),
    (False, ("float32", "auto: CPU lacks AVX512-BF16/AMX-BF16, bf16 would be emulated")),
])
def test_sample_dtype_auto_follows_the_cpu(monkeypatch, fast, expected):
    monkeypatch.setattr(precision, "cpu_bf16_fast", lambda: fast)
    assert sample_dtype("auto", sample_device("cpu")) == expected
    import torch

    assert sample_dtype("auto", torch.device("cuda")) == ("bfloat16", "auto: cuda")  # whatever the CPU


def test_sample_dtype_given_and_refused():
    assert sample_dtype("float16", "cpu") == ("float16", "--dtype")
    assert sample_dtype("bf16", "cpu") == ("bfloat16", "--dtype")
    with pytest.raises(ValueError, match=re.escape("--dtype 'half'; valid: auto, float32, fp32, bfloat16, bf16")):
        sample_dtype("half", "cpu")


def test_sample_device():
    import torch

    assert sample_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert sample_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu' is not a device; valid: auto, cpu, cuda"):
        sample_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available here; valid: auto, cpu"):
            sample_device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.mark.parametrize("fast,dtype", [(False, "float32"), (True, "bfloat16")])
def test_sample_says_what_it_runs_first_and_loads_that_dtype(tiny, tmp_path, monkeypatch, capsys, fast, dtype):
    """The first line names the model, dtype (and why), attention backend and device; the tree's
    picture lands in the current directory."""
    from treepo import Engine

    monkeypatch.setattr(precision, "cpu_bf16_fast", lambda: fast)
    loaded = []
    real = Engine.from_pretrained.__func__
    monkeypatch.setattr(Engine, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loaded.append(kw) or real(cls, *a, **kw)))
    monkeypatch.chdir(tmp_path)
    argv = ["sample", "--model", tiny, "--raw", "--prompt", "ab", "-n", "2", "--max-tokens", "4", "--tree",
            "--segment-len", "2", "--depth", "2", "--backend", "torch", "--device", "cpu", "--html", "t.html"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    why = "has" if fast else "lacks"
    assert err.splitlines()[0].startswith(f"treepo sample: model, {dtype} (auto: CPU {why} AVX512-BF16/AMX-BF16")
    assert err.splitlines()[0].endswith("), attention torch, device cpu")
    assert [kw["dtype"] for kw in loaded] == [dtype]
    assert (tmp_path / "t.html").read_text().startswith("<")


# ---------------------------------------------------------------------------- scripts/main.sh (item 4)

def test_main_sh_runs_treepo_in_the_callers_directory(tmp_path):
    """main.sh (the real file) in a stub checkout: its setup.sh and venv's treepo are stubs that
    record what they were run with."""
    repo, caller = tmp_path / "repo", tmp_path / "caller"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    caller.mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "main.sh"), repo / "scripts" / "main.sh")
    (repo / "scripts" / "setup.sh").write_text('echo "setup ran in $PWD" >> "$(dirname "$0")/../setup.log"\n')
    (repo / ".venv" / "bin" / "activate").write_text(f'export PATH="{repo}/.venv/bin:$PATH"\n')
    treepo = repo / ".venv" / "bin" / "treepo"
    treepo.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
    treepo.chmod(0o755)

    def main_sh(*args):
        res = subprocess.run(["bash", str(repo / "scripts" / "main.sh"), *args], cwd=caller, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()

    assert main_sh("sample", "--tree", "--html", "pic.html") == [str(caller), "sample", "--tree", "--html", "pic.html"]
    assert main_sh() == [str(caller), "train"]
    assert (repo / "setup.log").read_text().count("setup ran in") == 2


def test_without_the_source_flags_still_parse(monkeypatch):
    import inspect

    def no_source(obj):
        raise OSError("could not get source code")

    field_docs.cache_clear()
    monkeypatch.setattr(inspect, "getsource", no_source)
    try:
        assert field_docs(TrainConfig) == {}
        assert parse_args(["--segment-len", "8"]).segment_len == 8
    finally:
        field_docs.cache_clear()


# ---------------------------------------------------------------------------- treepo eval (issue 16)

def test_eval_compares_samplers_on_the_same_problems(tiny, tmp_path, capsys):
    import json

    from trainer_fixtures import write_task

    task = write_task(str(tmp_path / "task.jsonl"), n=5)
    argv = ["eval", "--model", tiny, "--dataset", task, "--sampler", "seq:2,tree:w4:2x3:b2", "--max-tokens", "6",
            "--reward-fn", "trainer_fixtures:even_token_reward", "--backend", "torch", "--device", "cpu",
            "--problems", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{task}: 3 problems, temperature 0.6, <= 6 tokens")
    assert out[1].split() == ["sampler", "n", "problems", "mean@n", "maj@n", "pass@1", "pass@n", "tokens",
                              "tokens/problem", "wall_s"]
    rows = json.loads(out[-1])["rows"]
    assert [r["sampler"] for r in rows] == ["seq:2", "tree:w4:2x3:b2"] and [r["n"] for r in rows] == [2, 4]
    for r in rows:
        assert r["problems"] == 3 and 0 <= r["mean@n"] <= r["pass@n"] <= 1
        assert r["tokens"] > 3 * 1 and r["tokens/problem"] == r["tokens"] / 3


@pytest.mark.parametrize("flags,msg", [
    (["--sampler", "tree:w4"], "sampler 'tree:w4': needs the width"),
    (["--sampler", "beam:4"], "unknown kind 'beam'"),
    (["--dataset", "mmlu"], "dataset 'mmlu'; valid: heldout, gsm8k, or a path to a .jsonl file"),
    (["--problems", "-1"], "--problems -1"),
    (["--run", "/nonexistent/run"], "run /nonexistent/run: cannot read its config.json"),
])
def test_eval_refuses_bad_input_before_loading_the_model(flags, msg, capsys, monkeypatch):
    import treepo.cli as cli

    monkeypatch.setattr(cli, "_engine", lambda args: pytest.fail("the model loaded before the input was checked"))
    assert main(["eval", *flags]) == 2
    assert msg in capsys.readouterr().err

