"""The checkpoint's tokenizer and chat-templated prompts (used by the CLI, the trainer and evaluation)."""
from __future__ import annotations

import os


def load_tokenizer(path: str):
    """The checkpoint's tokenizer (transformers), or None if it has none."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    if os.path.exists(os.path.join(path, "tokenizer.json")):  # the fast class loads ~4x quicker
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def chat_prompt_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """Token ids of `text` as one user turn with the model's chat template (if it has one)."""
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; pass token ids instead of text")
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(text)
