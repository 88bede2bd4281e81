"""Command line: `treepo train` (TreePO training), `treepo sample` (completions or a tree from the
bundled or a given model), `treepo info` (versions, attention backends)."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _engine(args):
    from treepo.assets import bundled_model_path

    from . import Engine

    path = args.model or bundled_model_path()
    return Engine.from_pretrained(path, dtype=args.dtype, attention_backend=args.backend)


def cmd_sample(args):
    from . import SamplingParams
    from .engine.tokenizer import chat_prompt_ids

    t0 = time.perf_counter()
    eng = _engine(args)
    load_s = time.perf_counter() - t0
    ids = chat_prompt_ids(eng.tokenizer, args.prompt) if not args.raw else eng.tokenizer.encode(args.prompt)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    if args.tree:
        return _sample_tree(eng, ids, params, args)
    t0 = time.perf_counter()
    outs = eng.generate([ids], params)[0]
    gen_s = time.perf_counter() - t0
    for i, c in enumerate(outs):
        mean_lp = sum(c.logprobs) / len(c.logprobs)
        print(f"--- completion {i} ({len(c.token_ids)} tokens, finish={c.finish_reason}, mean logprob {mean_lp:.3f})")
        print(c.text)
    st = eng.stats
    print(f"--- loaded in {load_s:.2f}s; generated {sum(len(c.token_ids) for c in outs)} tokens in {gen_s:.2f}s; "
          f"prefill {st.prefill_tokens} tokens, {st.forward_passes} forward passes, peak KV pages "
          f"{st.peak_kv_pages}/{st.kv_pages_total}", file=sys.stderr)


def _sample_tree(eng, ids, params, args):
    from treepo.rollout.sampler import TreeSampler
    from treepo.rollout.tree import TreeConfig
    from treepo.rollout.viz import outline, trees_html

    cfg = TreeConfig(segment_len=args.segment_len, max_depth=args.depth, max_width=args.n,
                     branch_factor=args.branch, seed=args.seed)
    (tree,) = TreeSampler(eng, cfg).sample([ids], params)
    dec = eng.tokenizer.decode
    texts = [dec(leaf.token_ids, skip_special_tokens=True) for leaf in tree.leaves]
    rewards = advantages = None
    if args.answer is not None:  # score the leaves as the trainer does: math reward, tree advantages
        import torch

        from treepo.advantages import tree_advantages
        from treepo.train.rewards import math_reward

        rewards = [math_reward(t, args.answer) for t in texts]
        advantages = tree_advantages(torch.tensor(rewards), [leaf.path for leaf in tree.leaves],
                                     torch.zeros(len(rewards), dtype=torch.long)).tolist()
    print(outline(tree, dec))
    for i, (leaf, text) in enumerate(zip(tree.leaves, texts)):
        scored = f", reward {rewards[i]:g}, advantage {advantages[i]:+.3f}" if rewards else ""
        print(f"--- leaf {i} (depth {leaf.depth}, {len(leaf.token_ids)} tokens, {leaf.finish_reason}"
              f"{', fallback' if leaf.from_fallback else ''}{scored})")
        print(text)
    with open(args.html, "w") as f:
        f.write(trees_html([tree], dec, [rewards] if rewards else None, [args.prompt],
                           [advantages] if advantages else None))
    st = tree.stats
    print(f"--- {len(tree.leaves)} leaves in {st.wall_time:.2f}s; {st.processed_tokens} tokens processed "
          f"({st.prefill_tokens} prefill), peak KV pages {st.peak_kv_pages}; picture: {args.html}", file=sys.stderr)


def cmd_info(args):
    import torch

    from treepo.engine.attention import backend_status, make_backend
    from treepo_kernels import cpu as kernels
    from treepo_kernels import ext

    extension = ext.load().describe()  # the prebuilt C++ extension, else built just in time (once, cached)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = {}
    for name in ("torch", "triton", "cpu"):
        ok, why = backend_status(name, device)
        status[name] = "available" + (f" ({why})" if why else "") if ok else f"unavailable: {why}"
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "device": device,
            "cpu_extension": extension, "attention_backends": status,
            "auto_backend": make_backend("auto", device).name}
    impl = kernels.gemm_impl()
    info["cpu_packed_gemm"] = (f"{impl}: used for bf16 models on the CPU" if impl == "avx512bf16" else
                               f"not used ({impl or 'no C++ extension'})")
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info, indent=1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # all TrainConfig fields are flags: see `treepo train --help`
        from treepo.train.trainer import cli as train_cli

        return train_cli(argv[1:])  # a bad input is one line on stderr and exit status 2
    ap = argparse.ArgumentParser(prog="treepo", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sample", help="sample completions for a prompt")
    sp.add_argument("--prompt", default="What is 7 + 5? Put the answer in \\boxed{}.")
    sp.add_argument("--model", default=None, help="HF checkpoint directory (default: bundled SmolLM2-135M-Instruct)")
    sp.add_argument("-n", type=int, default=4)
    sp.add_argument("--max-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=-1)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: checkpoint's)")
    sp.add_argument("--backend", default="auto", help="attention backend: auto | torch | triton | cpu")
    sp.add_argument("--raw", action="store_true", help="no chat template")
    sp.add_argument("--tree", action="store_true", help="TreePO tree sampling: -n leaves; outline + HTML picture")
    sp.add_argument("--segment-len", type=int, default=32)
    sp.add_argument("--depth", type=int, default=4)
    sp.add_argument("--branch", type=int, default=2)
    sp.add_argument("--html", default="treepo_tree.html", help="where --tree writes its picture")
    sp.add_argument("--answer", default=None,
                    help="with --tree: the correct answer; leaves get the math reward and tree advantages")
    sp.set_defaults(func=cmd_sample)
    ip = sub.add_parser("info", help="versions and available attention backends")
    ip.set_defaults(func=cmd_info)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"treepo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
