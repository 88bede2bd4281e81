"""Engine throughput vs transformers `generate` on the bundled SmolLM2-135M-Instruct (CPU).

Workload (issue #2): 8 chat-templated arithmetic prompts x 16 samples x 128 new tokens, EOS
ignored, temperature 1.0, bf16. Each provider runs in its own subprocess (same script, same run)
so peak memory (max RSS) is its own. Usage:

    python bench/bench_engine.py [--samples 16] [--tokens 128] [--dtype bfloat16] [--threads 2]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import chat_prompts, print_table, result_line  # noqa: E402


def run_provider(args) -> dict:
    torch.set_num_threads(args.threads)
    from treepo.assets import bundled_model_path
    from treepo.engine.tokenizer import load_tokenizer

    path = bundled_model_path()
    tok = load_tokenizer(path)
    prompts = chat_prompts(tok)
    dtype = getattr(torch, args.dtype)
    if args.provider == "treepo":
        from treepo import Engine, SamplingParams

        eng = Engine.from_pretrained(path, dtype=args.dtype, attention_backend=args.backend)
        params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
        eng.generate(prompts[:1], SamplingParams(n=2, max_tokens=4, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        outs = eng.generate(prompts, params)
        wall = time.perf_counter() - t0
        n_tokens = sum(len(c.token_ids) for o in outs for c in o)
        st = eng.stats
        extra = {"prefill_tokens": st.prefill_tokens - 0, "peak_kv_pages": st.peak_kv_pages}
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tok.padding_side = "left"
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.tokens,
                  min_new_tokens=args.tokens, num_return_sequences=args.samples, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            model.generate(**{k: v[:1] for k, v in batch.items()}, **{**kw, "max_new_tokens": 4,
                           "min_new_tokens": 4, "num_return_sequences": 2})  # warm-up
            torch.manual_seed(0)
            t0 = time.perf_counter()
            out = model.generate(**batch, **kw)
            wall = time.perf_counter() - t0
        n_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        extra = {"padded_prompt_len": batch["input_ids"].shape[1]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"provider": args.provider, "wall_s": wall, "new_tokens": n_tokens,
            "tokens_per_s": n_tokens / wall, "samples_per_s": len(prompts) * args.samples / wall,
            "peak_rss_mb": peak, **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--providers", default="treepo,transformers")
    args = ap.parse_args()
    if args.provider:
        print(json.dumps(run_provider(args)))
        return
    rows = []
    for prov in args.providers.split(","):
        cmd = [sys.executable, __file__, "--provider", prov, "--samples", str(args.samples), "--tokens",
               str(args.tokens), "--dtype", args.dtype, "--threads", str(args.threads), "--backend", args.backend]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"provider {prov} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"8 prompts x {args.samples} samples x {args.tokens} new tokens, {args.dtype}, {args.threads} threads")
    print_table(rows, ["provider", "wall_s", "tokens_per_s", "samples_per_s", "peak_rss_mb"])
    by = {r["provider"]: r for r in rows}
    payload = {"workload": {"prompts": 8, "samples": args.samples, "new_tokens": args.tokens, "dtype": args.dtype},
               "results": rows}
    if "treepo" in by and "transformers" in by:
        payload["speedup_vs_transformers"] = by["treepo"]["tokens_per_s"] / by["transformers"]["tokens_per_s"]
        print(f"treepo / transformers tokens/s: {payload['speedup_vs_transformers']:.2f}x")
    result_line("engine", payload)


if __name__ == "__main__":
    main()
