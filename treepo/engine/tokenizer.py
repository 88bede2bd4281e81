"""The checkpoint's tokenizer and chat-templated prompts (used by the CLI, the trainer and evaluation)."""
from __future__ import annotations

import os

TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(path: str):
    """The checkpoint's tokenizer (transformers), or None if it has none. A tokenizer that fails to
    load is a ValueError naming the file at fault (a JSON error) or the directory."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        if os.path.exists(os.path.join(path, "tokenizer.json")):  # the fast class loads ~4x quicker
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers and tokenizers raise many types; find the culprit only on failure
        from .loader import read_json

        for name in TOKENIZER_JSON:  # a damaged file is the usual cause: name it
            if os.path.exists(os.path.join(path, name)):
                read_json(os.path.join(path, name))
        raise ValueError(f"the tokenizer in {path} does not load: {type(e).__name__}: {e}") from e


def chat_prompt_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """Token ids of `text` as one user turn with the model's chat template (if it has one)."""
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; pass token ids instead of text")
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(text)
