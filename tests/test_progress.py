"""Progress bars on long work: shown on a terminal (or TREEPO_PROGRESS=1), silent otherwise, and
they never change a result."""
import pytest
from helpers import tiny_hf_model

from treepo import Engine, SamplingParams, TreeConfig
from treepo.progress import enabled, note, progress
from treepo.rollout.sampler import TreeSampler


@pytest.fixture(scope="module")
def engine():
    return Engine.from_model(tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2), num_pages=128, page_size=4)


def test_bars_only_on_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("TREEPO_PROGRESS", raising=False)
    assert not enabled()  # pytest captures stderr: not a terminal
    monkeypatch.setenv("TREEPO_PROGRESS", "1")
    assert enabled()
    monkeypatch.setenv("TREEPO_PROGRESS", "0")
    assert not enabled()
    with progress("work", 3) as bar:  # off: a silent stand-in that counts
        bar.update(2)
        bar.set_postfix_str("x")
    assert bar.n == 2
    assert type(progress(None, 3)).__name__ == "_Off"


def test_generate_and_tree_sampling_show_bars_and_the_same_results(engine, monkeypatch, capsys):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=1)
    prompts = [[5, 6, 7], [8, 9]]
    monkeypatch.setenv("TREEPO_PROGRESS", "0")
    quiet = engine.generate(prompts, params, progress="generating")
    sampler = TreeSampler(engine, TreeConfig(segment_len=2, max_depth=3, max_width=4, branch_factor=2, seed=0))
    quiet_trees = sampler.sample(prompts, params, progress="trees")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TREEPO_PROGRESS", "1")
    loud = engine.generate(prompts, params, progress="generating")
    err = capsys.readouterr().err
    assert "generating" in err and "/6" in err and "seq" in err
    loud_trees = sampler.sample(prompts, params, progress="trees")
    err = capsys.readouterr().err
    assert "trees" in err and "/8" in err and "leaf" in err
    assert [[c.token_ids for c in cs] for cs in loud] == [[c.token_ids for c in cs] for cs in quiet]
    assert [[lf.token_ids for lf in t.leaves] for t in loud_trees] == [[lf.token_ids for lf in t.leaves]
                                                                       for t in quiet_trees]


def test_note_is_one_line_on_stderr(capsys):
    note("converting something (first use only)...")
    assert capsys.readouterr().err == "treepo: converting something (first use only)...\n"
