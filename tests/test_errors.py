"""Bad input names itself (issue 12, items 2, 10): the file and field, and what would be valid."""
import json
import os
import shutil

import pytest
import torch

from trainer_fixtures import tiny_checkpoint

from treepo.engine.loader import load_model
from treepo.engine.tokenizer import load_tokenizer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


def copy_of(tiny, tmp_path) -> str:
    d = str(tmp_path / "ckpt")
    shutil.copytree(tiny, d)
    return d


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
