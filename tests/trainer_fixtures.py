"""A tiny random Llama with the real SmolLM2 tokenizer, and a trivially learnable reward."""
import json

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!+-*/=\\{}\n"


def char_tokenizer():
    """A character-level fast tokenizer with a chat template (a small vocabulary a tiny model can
    move quickly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tok


def tiny_checkpoint(path: str, seed: int = 0) -> str:
    """Write a 2-layer random Llama over a character vocabulary, with its tokenizer, to path."""
    import torch  # here, not at the top: reward workers import this module for even_token_reward
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_task(path: str, n: int = 64) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"Say anything {i}.", "answer": "0"}) + "\n")
    return path


def even_token_reward(text, sample):
    """In [-1, 1]: how much more often the response uses even token ids than odd ones."""
    ids = sample["response_ids"]
    return 2.0 * sum(t % 2 == 0 for t in ids) / max(len(ids), 1) - 1.0


def even_token_reward_hanging(text, sample):
    """even_token_reward, except that call number $TREEPO_TEST_HANG_AT (counted in the file
    $TREEPO_TEST_HANG_FILE + ".count") writes its worker's pid to $TREEPO_TEST_HANG_FILE and
    then spins forever: a reward function stuck in a CPU loop, for the kill-mid-reward test."""
    import os

    path = os.environ.get("TREEPO_TEST_HANG_FILE")
    if path:
        with open(path + ".count", "a") as f:
            f.write(".")
        if os.path.getsize(path + ".count") == int(os.environ["TREEPO_TEST_HANG_AT"]):
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            while True:
                pass
    return even_token_reward(text, sample)
