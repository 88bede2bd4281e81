"""Loading a Hugging Face checkpoint directory into our CausalLM (config.json + safetensors).

Every tensor name and shape is checked against the model the config describes, so a wrong or
damaged checkpoint is an error that names the file and the tensors, never a silent mismatch.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig
from .model import CausalLM, rope_inv_freq

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, cfg: ModelConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return DTYPES.get(str(cfg.torch_dtype), torch.float32) if cfg and cfg.torch_dtype else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise FileNotFoundError(f"checkpoint {path}: shards listed in model.safetensors.index.json "
                                    f"are missing: {missing}")
        return [os.path.join(path, n) for n in names]
    if os.path.exists(single):
        return [single]
    present = sorted(os.listdir(path))
    raise FileNotFoundError(f"checkpoint {path} has no model.safetensors or model.safetensors.index.json "
                            f"(found: {present[:10]}); only safetensors checkpoints are supported")


def load_model(path: str, dtype=None, device=None) -> CausalLM:
    """Load a Hugging Face checkpoint directory (config.json + single or sharded safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"checkpoint {path} has no config.json")
    with open(cfg_file) as f:
        hf_cfg = json.load(f)
    cfg = ModelConfig.from_hf(hf_cfg)
    dtype = resolve_dtype(dtype, cfg)
    state = {}
    for file in _weight_files(path):
        try:
            state.update(load_file(file, device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint file {file} is corrupted or unreadable: {e}") from e
    with torch.device("meta"):
        model = CausalLM(cfg)
    load_state(model, state, source=path, dtype=dtype)
    model.hf_config = hf_cfg
    return model.to(device or "cpu").eval()


def load_state(model: CausalLM, state: dict, source: str = "state dict", dtype=None) -> None:
    """Assign `state` (HF names) to `model`'s parameters, checking every name and shape."""
    cfg = model.config
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [f"{k}: {tuple(state[k].shape)} (expected {tuple(s)})"
                 for k, s in expected.items() if k in state and state[k].shape != s]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if bad_shape:
        problems.append(f"mis-shaped tensors {bad_shape[:8]}")
    if problems:
        raise ValueError(f"{source} does not match a {cfg.family} model with this config.json: "
                         + "; ".join(problems))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(cfg)
    model.tie_weights()
