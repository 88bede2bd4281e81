"""Command line: `treepo train` (TreePO training), `treepo sample` (completions or a tree from the
bundled or a given model), `treepo eval` (accuracy and compute of best-of-N or a tree sampler on
an evaluation set), `treepo info` (versions, attention backends).

Flags take underscores or dashes (--max_tokens = --max-tokens); relative paths are the caller's:
nothing here (or in scripts/main.sh) changes the working directory."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from treepo.flags import METAVARS, spellings

BUNDLED_NAME = "SmolLM2-135M-Instruct"


def sample_device(setting: str):
    """The torch.device of `treepo sample --device setting`: "auto" = cuda when available, else cpu."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ValueError(f"--device {setting!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {setting!r}: CUDA is not available here; valid: auto, cpu")
    return device


def sample_dtype(setting: str, device) -> tuple[str, str]:
    """(weight dtype name, why) for `treepo sample --dtype setting` on `device`.

    "auto" is the trainer's engine_dtype "auto" (train/precision.py): bfloat16 on CUDA and on a CPU
    with AVX512-BF16/AMX-BF16 (the packed bf16 GEMMs run there), else float32, since without those
    instructions torch emulates bf16 matmuls, several times slower. Any other setting is a dtype
    name for the loader, used as given."""
    from treepo.engine.loader import DTYPES
    from treepo.train.precision import resolve_engine_dtype

    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"--dtype {setting!r}; valid: auto, {', '.join(DTYPES)}")
        return str(DTYPES[setting]).removeprefix("torch."), "--dtype"
    name = resolve_engine_dtype("auto", device)
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cpu":
        return name, f"auto: {kind}"
    if name == "bfloat16":
        return name, "auto: CPU has AVX512-BF16/AMX-BF16"
    return name, "auto: CPU lacks AVX512-BF16/AMX-BF16, bf16 would be emulated"


def _engine(args):
    """The Engine for `treepo sample`, after one stderr line saying what it will run."""
    from treepo.assets import bundled_model_path
    from treepo.engine.attention import make_backend

    from . import Engine

    device = sample_device(args.device)
    dtype, why = sample_dtype(args.dtype, device)
    backend = make_backend(args.backend, device).name  # refused here, before loading, when it cannot run
    name = os.path.basename(os.path.normpath(args.model)) if args.model else BUNDLED_NAME
    print(f"treepo {args.cmd}: {name}, {dtype} ({why}), attention {backend}, device {device}", file=sys.stderr,
          flush=True)
    path = args.model or bundled_model_path()
    return Engine.from_pretrained(path, device=device, dtype=dtype, attention_backend=backend)


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
    outs = eng.generate([ids], params, progress="sampling")[0]
    gen_s = time.perf_counter() - t0
    for i, c in enumerate(outs):
        mean_lp = sum(c.logprobs) / len(c.logprobs)
        print(f"--- completion {i} ({len(c.token_ids)} tokens, finish={c.finish_reason}, mean logprob {mean_lp:.3f})")
        print(c.text)
    st = eng.stats
    print(f"--- loaded in {load_s:.2f}s; generated {sum(len(c.token_ids) for c in outs)} tokens in {gen_s:.2f}s; "
          f"prefill {st.prefill_tokens} tokens, {st.forward_passes} forward passes, peak KV pages "
          f"{st.peak_kv_pages}/{st.kv_pages_total}", file=sys.stderr)


EVAL_COLS = ("sampler", "n", "problems", "mean@n", "maj@n", "pass@1", "pass@n", "tokens", "tokens/problem",
             "wall_s")


def cmd_eval(args):
    """Every --sampler on the same problems: metrics, tokens through the engine, wall seconds."""
    from treepo.train.rewards.problems import ProblemScorer
    from treepo.train.test_time import eval_problems, evaluate_search, parse_search, search_summary

    if args.model and args.run:
        raise ValueError("give --model or --run (whose hf/ export is the model), not both")
    searches = [parse_search(spec, args.max_tokens) for spec in args.sampler.split(",") if spec.strip()]
    if not searches:
        raise ValueError(f"--sampler {args.sampler!r} is empty; e.g. seq:4 or tree:w8:d4:b2")
    if args.problems < 0:
        raise ValueError(f"--problems {args.problems}; give 0 (all) or a positive count")
    probs = eval_problems(args.dataset, args.run, data_seed=args.data_seed)
    probs = probs[:args.problems] if args.problems else probs
    scorer = ProblemScorer(args.reward_fn)  # a bad module:function is refused here, before the model loads
    if args.run:
        args.model = os.path.join(args.run, "hf")
        if not os.path.isdir(args.model):
            raise ValueError(f"--run {args.run} has no hf/ export (train with --export_hf true)")
    eng = _engine(args)
    rows = []
    for search in searches:
        res = evaluate_search(eng, probs, scorer, search, temperature=args.temperature, max_tokens=args.max_tokens,
                              seed=args.seed, progress=search.spec)
        got = {"sampler": search.spec} | search_summary(res, search) | res["compute"]
        got["tokens/problem"] = got["tokens"] / max(got["problems"], 1)
        rows.append({k: got[k] for k in EVAL_COLS})
    widths = {k: max(len(k), *(len(_cell(r[k])) for r in rows)) for k in EVAL_COLS}
    print(f"{args.dataset}: {len(probs)} problems, temperature {args.temperature}, <= {args.max_tokens} tokens, "
          f"seed {args.seed}")
    print("  ".join(k.rjust(widths[k]) for k in EVAL_COLS))
    for r in rows:
        print("  ".join(_cell(r[k]).rjust(widths[k]) for k in EVAL_COLS))
    print(json.dumps({"dataset": args.dataset, "rows": rows}))


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:.0f}" if isinstance(v, float) else str(v)


def _sample_tree(eng, ids, params, args):
    from treepo.rollout.sampler import TreeSampler
    from treepo.rollout.tree import TreeConfig
    from treepo.rollout.viz import outline, trees_html

    cfg = TreeConfig(segment_len=args.segment_len, max_depth=args.depth, max_width=args.n,
                     branch_factor=args.branch, seed=args.seed)
    (tree,) = TreeSampler(eng, cfg).sample([ids], params, progress="sampling a tree")
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


def _flag_adder(parser: argparse.ArgumentParser):
    """add(name, **kw) on parser: the flag with both spellings (--max_tokens, --max-tokens:
    treepo.flags.spellings), dest name, and its type's metavar unless it is an action flag."""
    def add(name, **kw):
        if "action" not in kw:
            kw["metavar"] = METAVARS[kw.get("type", str)]
        parser.add_argument(*spellings(name), dest=name, **kw)
    return add


def build_parser() -> argparse.ArgumentParser:
    """The `treepo` parser; `train` is listed here, but its flags are treepo.train.config's."""
    ap = argparse.ArgumentParser(prog="treepo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{train,sample,eval,info}")
    sub.add_parser("train", help="TreePO RL training; every TrainConfig field is a flag: treepo train --help",
                   add_help=False)
    sp = sub.add_parser("sample", help="sample completions (or a TreePO tree) for a prompt",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arg = _flag_adder(sp)
    arg("prompt", default="What is 7 + 5? Put the answer in \\boxed{}.", help="the user message")
    arg("model", default=None, help=f"HF checkpoint directory (None: the bundled {BUNDLED_NAME})")
    sp.add_argument("-n", type=int, default=4, metavar="INT", help="completions (with --tree: leaves)")
    arg("max_tokens", type=int, default=128, help="new tokens per completion")
    arg("temperature", type=float, default=1.0, help="sampling temperature")
    arg("top_p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    arg("top_k", type=int, default=-1, help="top-k sampling (-1 = off)")
    arg("seed", type=int, default=0, help="sampling seed")
    arg("dtype", default="auto", help="weights: auto (bfloat16 on CUDA and on a CPU with AVX512-BF16/AMX-BF16, "
                                      "else float32) | float32 | bfloat16 | float16")
    arg("device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    arg("backend", default="auto", help="attention backend: auto | torch | triton | cpu")
    arg("raw", action="store_true", help="no chat template")
    arg("tree", action="store_true", help="TreePO tree sampling: -n leaves; outline + HTML picture")
    arg("segment_len", type=int, default=32, help="--tree: tokens per segment")
    arg("depth", type=int, default=4, help="--tree: segments on a root-to-leaf path")
    arg("branch", type=int, default=2, help="--tree: children of a node that branches")
    arg("html", default="treepo_tree.html", help="where --tree writes its picture (relative: to the current "
                                                 "directory)")
    arg("answer", default=None, help="--tree: the correct answer; leaves get the math reward and tree advantages")
    sp.set_defaults(func=cmd_sample)
    ep = sub.add_parser("eval", help="accuracy (mean@n, maj@n, pass@k) and compute of best-of-N or TreePO trees",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    earg = _flag_adder(ep)
    earg("model", default=None, help=f"HF checkpoint directory (None: the bundled {BUNDLED_NAME})")
    earg("run", default=None, help="a trainer run directory: its hf/ export is the model, its held-out set the "
                                   "heldout dataset")
    earg("dataset", default="heldout", help="heldout (the trainer's held-out problems) | gsm8k (the 100 GSM8K test "
                                            "problems) | a .jsonl file of {question, answer}")
    earg("sampler", default="seq:4", help="comma-separated samplers: seq:N (best-of-N) or tree:wW:DxL:bB[:rLO-HI] "
                                          "(dD: segment = max_tokens / D), e.g. seq:8,tree:w8:d4:b2")
    earg("problems", type=int, default=0, help="the first this many problems (0 = all)")
    earg("max_tokens", type=int, default=256, help="response budget per sample")
    earg("temperature", type=float, default=0.6, help="sampling temperature")
    earg("seed", type=int, default=0, help="sampling seed (trees' too)")
    earg("data_seed", type=int, default=0, help="without --run: the treepo train --seed that drew the held-out set")
    earg("reward_fn", default=None, help="module:function reward (default: the trainer's problem reward)")
    earg("dtype", default="auto", help="weights: auto | float32 | bfloat16 | float16")
    earg("device", default="auto", help="auto | cpu | cuda | cuda:N")
    earg("backend", default="auto", help="attention backend: auto | torch | triton | cpu")
    ep.set_defaults(func=cmd_eval)
    ip = sub.add_parser("info", help="versions and available attention backends")
    ip.set_defaults(func=cmd_info)
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # all TrainConfig fields are flags: see `treepo train --help`
        from treepo.train.trainer import cli as train_cli

        return train_cli(argv[1:])  # a bad input is one line on stderr and exit status 2
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"treepo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
