"""fp32 vs bf16 on this machine, for the two places the trainer chooses a precision
(treepo/train/precision.py): (a) a training forward+backward of the bundled SmolLM2-135M on
rows x tokens (DAPO loss through the scoring forward), fp32 vs bf16 autocast; (b) engine decoding,
Engine.generate of `prompts` chat prompts x `tokens` new tokens (greedy, ignore_eos), with the
engine's weights in bfloat16 vs float32. It says whether precision="auto" chose right here.
Usage:

    python bench/bench_precision.py [--rows 8] [--tokens 192] [--decode_tokens 64] [--repeat 2]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import chat_prompts, median_ms, print_table, result_line  # noqa: E402


def train_seconds(model, dtype, rows, tokens, repeat):
    """Median seconds of one forward+backward (after a warm-up) on a fixed random batch."""
    from treepo.losses import policy_loss
    from treepo.train.precision import autocast

    g = torch.Generator().manual_seed(0)
    Lp = tokens // 4
    ids = torch.randint(100, model.config.vocab_size, (rows, tokens), generator=g)  # [rows, tokens]
    pos = torch.arange(tokens).expand(rows, tokens)
    mask = torch.ones(rows, tokens - Lp)
    adv = torch.randn(rows, 1, generator=g).expand(rows, tokens - Lp)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast("cpu", dtype):
            logp, _ = model(ids, pos, attention_mask=torch.ones_like(ids), labels=ids[:, Lp:], label_start=Lp)
            loss, _ = policy_loss(logp, logp.detach(), adv, mask)
        loss.backward()

    return median_ms(step, repeat) / 1e3


def decode_tok_per_s(path, tokenizer, dtype, prompts, tokens):
    from treepo import Engine, SamplingParams
    from treepo.engine.loader import load_model

    eng = Engine(load_model(path, dtype=dtype), tokenizer, num_pages=1024, page_size=16)
    eng.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    wall = time.perf_counter() - t
    n = sum(len(o[0].token_ids) for o in outs)
    return wall, n / wall, eng.runner.packed is not None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=192)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--decode_tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="'train' or 'decode' to leave one part out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treepo.assets import bundled_model_path
    from treepo.engine.loader import load_model
    from treepo.engine.tokenizer import load_tokenizer
    from treepo.train.precision import cpu_bf16_fast, resolve_autocast, resolve_engine_dtype

    path = bundled_model_path()
    rows, payload = [], {"args": vars(args), "cpu_bf16_fast": cpu_bf16_fast()}
    if "train" not in args.skip:
        model = load_model(path, dtype="float32").train()
        for p in model.parameters():
            p.requires_grad_(True)
        t32 = train_seconds(model, None, args.rows, args.tokens, args.repeat)
        t16 = train_seconds(model, torch.bfloat16, args.rows, args.tokens, args.repeat)
        del model
        n = args.rows * args.tokens
        rows += [{"part": "train fwd+bwd", "precision": "fp32", "seconds": t32, "tok_per_s": n / t32},
                 {"part": "train fwd+bwd", "precision": "bf16 autocast", "seconds": t16,
                  "tok_per_s": n / t16, "vs_fp32": t16 / t32}]
        payload["train"] = {"fp32_s": t32, "bf16_autocast_s": t16, "bf16_over_fp32": t16 / t32,
                            "auto": str(resolve_autocast("auto", "cpu"))}
    if "decode" not in args.skip:
        tok = load_tokenizer(path)
        prompts = (chat_prompts(tok) * args.prompts)[:args.prompts]
        dec = {}
        for dt in ("float32", "bfloat16"):
            wall, tps, packed = decode_tok_per_s(path, tok, dt, prompts, args.decode_tokens)
            dec[dt] = tps
            rows.append({"part": "engine decode", "precision": dt, "seconds": wall, "tok_per_s": tps,
                         "packed_gemm": packed, "vs_fp32": dec["float32"] / tps if dt != "float32" else None})
        payload["decode"] = {"float32_tok_per_s": dec["float32"], "bfloat16_tok_per_s": dec["bfloat16"],
                             "bf16_over_fp32_time": dec["float32"] / dec["bfloat16"],
                             "auto": resolve_engine_dtype("auto", "cpu")}
    print(f"train {args.rows} x {args.tokens} tokens; decode {args.prompts} prompts x {args.decode_tokens} tokens; "
          f"{args.threads} threads; cpu_bf16_fast={payload['cpu_bf16_fast']}")
    print_table(rows, ["part", "precision", "seconds", "tok_per_s", "vs_fp32", "packed_gemm"])
    print("vs_fp32: time relative to fp32 (> 1: slower)")
    if "train" in payload:
        print(f"auto autocast here: {payload['train']['auto']} "
              f"(bf16 autocast takes {payload['train']['bf16_over_fp32']:.2f}x the fp32 time)")
    if "decode" in payload:
        print(f"auto engine dtype here: {payload['decode']['auto']} "
              f"(bf16 decoding takes {payload['decode']['bf16_over_fp32_time']:.2f}x the fp32 time)")
    result_line("precision", payload)


if __name__ == "__main__":
    main()
