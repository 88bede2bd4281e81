"""Loading a Hugging Face checkpoint directory into our CausalLM (config.json + safetensors).

Every tensor name and shape is checked against the model the config describes, so a wrong or
damaged checkpoint is an error that names the file and the tensors, never a silent mismatch.
"""
from __future__ import annotations

import json
import math
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


def read_json(file: str, what: str = "a JSON object"):
    """The JSON object in `file`; a syntax error or another top-level type is a ValueError naming the file."""
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    if not isinstance(d, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(d), "number")
        raise ValueError(f"{file}: expected {what}, got a JSON {kind}")
    return d


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: needs a \"weight_map\" object of tensor name -> shard file name")
        names = sorted(set(weight_map.values()))
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
    hf_cfg = read_json(cfg_file, "an object of model settings")
    try:
        cfg = ModelConfig.from_hf(hf_cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    dtype = resolve_dtype(dtype, cfg)
    state, files = {}, {}
    for file in _weight_files(path):
        try:
            part = load_file(file, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint file {file} is corrupted or unreadable: {e}") from e
        state.update(part)
        files.update(dict.fromkeys(part, file))
    with torch.device("meta"):
        model = CausalLM(cfg)
    load_state(model, state, source=path, dtype=dtype, files=files)
    model.hf_config = hf_cfg
    return model.to(device or "cpu").eval()


def load_state(model: CausalLM, state: dict, source: str = "state dict", dtype=None,
               files: dict[str, str] | None = None) -> None:
    """Assign `state` (HF names) to `model`'s parameters, checking every name and shape and that every
    value is finite (check_finite); `files` maps a tensor name to the file it came from, for errors."""
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
    raw = state
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    check_finite(state, raw, files or {}, source)
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(cfg)
    model.tie_weights()


def check_finite(state: dict, raw: dict, files: dict[str, str], source: str) -> None:
    """ValueError naming the file and tensor if any weight is NaN or inf (a model with one generates
    NaN log-probs). One sum per tensor (a NaN or inf propagates into it; reduced-precision sums
    accumulate in fp32 on the CPU): 60-120 ms for SmolLM2-135M (fp32 or bf16) on 2 busy cores, against
    1-8 s for torch.isfinite(t).all(), which only confirms a sum that is not finite (finite values can
    overflow, in fp16 most easily). `raw`: the tensors before a dtype conversion, to tell a damaged
    checkpoint from values beyond the range of the dtype asked for."""
    bad = [k for k, t in state.items() if t.is_floating_point()
           and not math.isfinite(t.sum()) and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    k = bad[0]
    t, where = state[k], files.get(k, source)
    count = int((~torch.isfinite(t)).sum())
    more = ""
    if len(bad) > 1:
        more = f"; {len(bad) - 1} more tensors too ({', '.join(bad[1:4])}{' ...' if len(bad) > 4 else ''})"
    if raw[k] is not t and bool(torch.isfinite(raw[k]).all()):
        big = raw[k].abs().max().item()
        raise ValueError(f"{where}: tensor {k} holds values up to {big:.3g}, beyond the range of {t.dtype} "
                         f"({count} become inf){more}; load it in a wider dtype (float32 or bfloat16)")
    raise ValueError(f"{where}: tensor {k} has {count} non-finite values (NaN or inf) of {t.numel()}{more}; "
                     "the weights are damaged")
