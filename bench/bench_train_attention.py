"""Attention for training over packed trees on a GPU: treepo_kernels/tree_attention.py vs FlexAttention
vs the unpacked varlen baseline (docs/kernels.md, "Tree attention for training").

Why: packing a tree (treepo/train/batch.py) computes every shared token once, but the saving is only
real if one attention layer over the packed tokens is about as fast per visible (query, key) pair
as a dense causal kernel over the unpacked root-to-leaf paths. The issue's targets, checked here
and printed as met / not met: (1) at least as fast as tuned FlexAttention with the same mask,
(2) >= 80% of the ideal speed-up over varlen, (3) within 10% of varlen when nothing is shared.

Shapes (TreePO-like, one tree unless --trees N packs N copies): 16 leaves, branching 2, 2, 2, 2
then 1, a 512-token prompt and 512-token segments, depth (segments per path) 4, 8 and 14; "no
sharing": 16 one-leaf trees of 512 + 4 x 512 tokens (the depth-4 paths, nothing shared); "prompt
group": one 512-token prompt shared by 8 leaves of 2048 own tokens. Heads (H_q, H_kv, d) =
(32, 8, 128), or --heads 9,3,64 (SmolLM2). bf16, one layer, q / k / v / dout random normal.

Providers, each timed for the forward (inputs requiring grad, as in training) and forward +
backward (autograd.grad of sum(out * dout), a fixed random dout), median of triton.testing.do_bench:
- treepo: `tree_attention` on a plan built once (plan_ms: its build); treepo_best: the best of a
  few tiles (query rows, keys per tile, warps) through `tree_attention_fwd` / `_bwd` directly;
- flex: `torch.compile(flex_attention, dynamic=True)`, mask_mod (kv <= q) & (q < visible_end[kv]),
  block mask built once (create_block_mask; for large T its compiled form, or the same BlockMask
  from the plan's tile lists if that fails), enable_gqa; compile_s: the first call;
  flex_tuned: the best forward + backward among the default and a few kernel_options block sizes,
  each with a block mask of its size;
- varlen: every root-to-leaf path as its own causal sequence (cu_seqlens), q / k / v gathered from
  the packed tensors: flash_attn.flash_attn_varlen_func if importable, else torch's varlen_attn.
A provider that fails reports its error string in the row instead of stopping the run.

Figures: TFLOP/s on the unique work: the visible pairs of the packed batch counted exactly
(sum_j visible_end[j] - j: key j is seen by queries j .. visible_end[j] - 1) times 4 * d * H_q for
the forward, 2.5x that for the backward (FlashAttention's convention), for every provider (so
varlen's figure is lowered by the work it repeats). Ideal speed-up over varlen: path tokens / T
(ideal_tok) and, exact, the visible pairs of the unpacked paths (sum L (L + 1) / 2) / the packed
visible pairs (ideal); the actual speed-up and its % of the ideal. Correctness: max |out - ref|
and the max relative error of dq / dk / dv against an fp32 reference computed per path (causal
attention over the path's gathered tokens, each packed query once), never the dense [T, T] mask.
The targets are judged on forward + backward, for the default tile and for the best tile.

Time: every shape's core figures (treepo's default tile, flex's default, varlen) come first, the
tuning (other tiles, flex kernel_options: mostly compile time) after, until --budget-s runs out;
what is left is reported as skipped, and --out gets the rows after every shape. Usage:

    python bench/bench_train_attention.py [--out DIR] [--heads 9,3,64] [--trees N] [--shapes d4,none]
    TRITON_INTERPRET=1 python bench/bench_train_attention.py --smoke   # CPU: tiny shapes, fp32
"""
import argparse
import inspect
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table  # noqa: E402

# key: (name, prompt, segment, branching per level, trees per copy)
SHAPES = {
    "d4": ("tree depth 4", 512, 512, [2, 2, 2, 2], 1),
    "none": ("no sharing: 16 x 2560", 512, 512, [1, 1, 1, 1], 16),
    "d8": ("tree depth 8", 512, 512, [2, 2, 2, 2] + [1] * 4, 1),
    "d14": ("tree depth 14", 512, 512, [2, 2, 2, 2] + [1] * 10, 1),
    "prompt": ("prompt group 8 x 2048", 512, 2048, [8], 1),
}
SMOKE = {
    "d2": ("tree depth 2", 24, 16, [2, 2], 1),
    "d3": ("tree depth 3", 24, 16, [2, 2, 1], 1),
    "none": ("no sharing: 4 x 56", 24, 16, [1, 1], 4),
    "prompt": ("prompt group 4 x 32", 24, 32, [4], 1),
}
NO_SHARING = "none"
# treepo tiles (query rows = tokens x packed heads, keys per tile, warps); the first is the default
TILES = [(64, 64, 4), (64, 32, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 128, 4)]
SMOKE_TILES = [(128, 32, 8)]  # (the interpreter's time: the default tile is timed as treepo only)
# flex_tuned: (label, block mask BLOCK_SIZE, kernel_options); un-prefixed BLOCK_M1.. set the backward
FLEX_TUNED = [
    ("m64 n64 mask64", 64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64,
                            "BLOCK_N2": 32}),
    ("m128 n128 mask128", 128, {"BLOCK_M": 128, "BLOCK_N": 128}),
    ("m128 n64 mask128", 128, {"BLOCK_M": 128, "BLOCK_N": 64}),
]
FWD_FLOP, BWD_FACTOR = 4, 2.5  # forward FLOPs per visible pair per (query head, d); backward = 2.5x


# ------------------------------------------------------------------------------ shapes, paths

def build_batch(shape, copies: int, seed: int = 0):
    from bench_tree_attention import make_tree

    from treepo.train.batch import pack_trees

    _, prompt, seg, branching, per_copy = shape
    g = torch.Generator().manual_seed(seed)
    return pack_trees([make_tree(g, prompt, seg, branching) for _ in range(per_copy * copies)])


def leaf_paths(batch) -> list[torch.Tensor]:
    """Packed indices of each leaf's root-to-leaf path (prompt, then its response tokens in order),
    from the (leaf, token) pairs - independent of visible_end, which the kernels consume."""
    rows, pos = batch.pair_row, batch.pair_pos
    tok = batch.target_index[batch.pair_unique]  # [P] packed index of each pair's token
    paths = []
    for r in range(batch.n_leaves):
        sel = (rows == r).nonzero().flatten()
        resp = tok[sel[pos[sel].argsort()]]
        last_prompt = int(batch.pred_index[batch.pair_unique[sel[pos[sel] == 0]]][0])  # predicts token 0
        tree = int(torch.searchsorted(batch.seq_offsets, last_prompt, right=True)) - 1
        start = int(batch.seq_offsets[tree])
        paths.append(torch.cat([torch.arange(start, last_prompt + 1), resp]))
    assert sum(len(p) for p in paths) == batch.leaf_tokens, "leaf paths disagree with PackedBatch.leaf_tokens"
    return paths


def pair_counts(visible_end: torch.Tensor, paths) -> tuple[int, int]:
    """(visible pairs packed, visible pairs of the unpacked causal paths)."""
    packed = int((visible_end.long() - torch.arange(visible_end.shape[0])).sum())
    return packed, sum(len(p) * (len(p) + 1) // 2 for p in paths)


def owners(flat: torch.Tensor, T: int) -> torch.Tensor:
    """[P] bool: the first occurrence of each packed index in the concatenated paths."""
    order = torch.arange(flat.shape[0], device=flat.device)
    first = torch.full((T,), flat.shape[0], dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, flat, order, "amin")
    return first[flat] == order


# ------------------------------------------------------------------------------- the reference

def path_reference(q, k, v, dout, paths, own, chunk_elems: int = 2**28):
    """fp32 out [T, H_q, D] and grads of sum(out * dout), per path: each packed query once (in the
    first path holding it), causal over that path's tokens, in chunks of at most chunk_elems scores."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D)
    qf, kf, vf, df = (t.detach().float() for t in (q, k, v, dout))
    out, dq = torch.zeros_like(qf), torch.zeros_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    at = 0
    for path in paths:
        path = path.to(q.device)
        mine = own[at:at + len(path)].nonzero().flatten()  # positions in the path whose query is computed here
        at += len(path)
        step = max(16, chunk_elems // (Hq * len(path)))
        for c in range(0, len(mine), step):
            p = mine[c:c + step]
            keys = path[:int(p[-1]) + 1]
            qc = qf[path[p]].view(-1, Hkv, g, D).permute(1, 2, 0, 3).requires_grad_()  # [Hkv, g, n, D]
            kc = kf[keys].permute(1, 0, 2).unsqueeze(1).requires_grad_()  # [Hkv, 1, L, D]
            vc = vf[keys].permute(1, 0, 2).unsqueeze(1).requires_grad_()
            s = (qc @ kc.transpose(-1, -2)) * scale  # [Hkv, g, n, L]
            causal = torch.arange(len(keys), device=q.device)[None, :] <= p[:, None]
            o = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ vc  # [Hkv, g, n, D]
            do = df[path[p]].view(-1, Hkv, g, D).permute(1, 2, 0, 3)
            gq, gk, gv = torch.autograd.grad(o, (qc, kc, vc), do)
            rows = path[p]
            out[rows] = o.detach().permute(2, 0, 1, 3).reshape(-1, Hq, D)
            dq[rows] = gq.permute(2, 0, 1, 3).reshape(-1, Hq, D)
            dk.index_add_(0, keys, gk.squeeze(1).permute(1, 0, 2))
            dv.index_add_(0, keys, gv.squeeze(1).permute(1, 0, 2))
    return out, (dq, dk, dv)


def errors(out, grads, ref) -> dict:
    """max |out - ref| and the max over dq, dk, dv of max |g - ref| / max |ref|."""
    ro, rg = ref
    e = {"err": (out.float() - ro).abs().max().item()}
    if grads is not None:
        e["gerr"] = max(((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                        for a, b in zip(grads, rg))
    return e


# ---------------------------------------------------------------------------------- providers

def treepo_default(q, k, v, dout, visible_end, ref, bench, sync):
    """`tree_attention` as training calls it: the plan's build time, fwd / fb ms, errors."""
    import treepo_kernels.tree_attention as ta

    r = {}
    hpp, block_q = ta.tile_for(q.shape[1], k.shape[1])

    def build():
        p = ta.plan_tree_attention(visible_end, block_q, ta.BLOCK_N)
        sync()
        return p

    plan = build()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        build()
        times.append(time.perf_counter() - t0)
    r["plan_ms"] = sorted(times)[1] * 1e3
    r["tiles"] = plan.tiles

    def fb():
        out = ta.tree_attention(q, k, v, plan)[0]
        return out, torch.autograd.grad(out, (q, k, v), dout)

    r["treepo_fb_ms"], (out, grads) = bench(fb, keep=True)
    r.update({f"treepo_{n}": x for n, x in errors(out, grads, ref).items()})
    r["treepo_fwd_ms"] = bench(lambda: ta.tree_attention(q, k, v, plan))
    return r


def treepo_tiles(q, k, v, dout, visible_end, ref, bench, tiles, deadline):
    """The best forward and forward + backward over tiles (rows, keys per tile, warps), timed
    through the launchers (the tile is not part of tree_attention's API), and the worst tile's errors."""
    import treepo_kernels.tree_attention as ta

    r = {}
    hpp = ta.tile_for(q.shape[1], k.shape[1])[0]
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    best, tile_err, tile_gerr, tile_errors = {}, 0.0, 0.0, []
    for rows, bn, warps in tiles:
        label = f"r{rows} n{bn} w{warps}"
        if time.perf_counter() > deadline:
            tile_errors.append(f"{label}: skipped (time budget)")
            continue
        try:
            pv = ta.plan_tree_attention(visible_end, max(16, rows // hpp), bn)

            def fwd(pv=pv, warps=warps):
                return ta.tree_attention_fwd(qd, kd, vd, pv, None, warps)

            def fbv(pv=pv, warps=warps):
                o, lse = ta.tree_attention_fwd(qd, kd, vd, pv, None, warps)
                return o, ta.tree_attention_bwd(dout, qd, kd, vd, o, lse, pv, None, warps)

            ms_fb, (o, gv) = bench(fbv, keep=True)
            e = errors(o, gv, ref)
            tile_err = max(tile_err, e["err"])
            tile_gerr = max(tile_gerr, e["gerr"])
            for kind, ms in (("fb", ms_fb), ("fwd", bench(fwd))):
                if kind not in best or ms < best[kind][0]:
                    best[kind] = (ms, label)
        except Exception as e:  # a tile the device cannot run (shared memory, registers): report it
            tile_errors.append(f"{label}: {type(e).__name__}: {e}"[:160])
    for kind in ("fwd", "fb"):
        if kind in best:
            r[f"treepo_best_{kind}_ms"], r[f"treepo_best_{kind}_tile"] = best[kind]
    r["treepo_tiles_err"], r["treepo_tiles_gerr"] = tile_err, tile_gerr  # the worst tile's errors
    if tile_errors:
        r["treepo_tile_errors"] = tile_errors
    return r


def flex_block_mask(visible_end, T, block_size, plan_for, build="auto"):
    """(BlockMask of the tree mask, how it was built): create_block_mask - eager while its [T, T]
    int64 + bool temporaries (~12 bytes a pair) take under half the free memory, else compiled (which
    fuses them away) - or, when that fails or with build="plan", the same mask from the plan's tile
    lists at this block size (full tiles listed apart, as create_block_mask does)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    ve = visible_end.long()

    def tree_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < ve[kv_idx])

    dev = visible_end.device
    err = "asked"
    if build != "plan":
        try:
            free = torch.cuda.mem_get_info()[0] if dev.type == "cuda" else 2**32
            if 12 * T * T < free // 2:
                return create_block_mask(tree_mask, None, None, T, T, dev, BLOCK_SIZE=block_size), "create_block_mask"
            bm = torch.compile(create_block_mask)(tree_mask, None, None, T, T, dev, BLOCK_SIZE=block_size)
            return bm, "create_block_mask compiled"
        except Exception as e:
            err = f"{type(e).__name__}: {e}"[:100]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    plan = plan_for(block_size)
    nb, nkb = plan.q_kv_ptr.shape[0] - 1, plan.kv_q_ptr.shape[0] - 1
    qb = torch.arange(nb, device=dev).repeat_interleave((plan.q_kv_ptr[1:] - plan.q_kv_ptr[:-1]).long())
    kb = plan.q_kv.long()
    is_full = torch.arange(kb.shape[0], device=dev) - plan.q_kv_ptr.long()[qb] < plan.q_kv_full.long()[qb]
    need = torch.zeros(nb, nkb, dtype=torch.bool, device=dev)
    full = torch.zeros_like(need)
    need[qb, kb] = True
    full[qb[is_full], kb[is_full]] = True

    def lists(m):  # [1, 1, nb] counts, [1, 1, nb, nkb] ascending block ids (the rest padding)
        idx = torch.where(m, torch.arange(nkb, device=dev), nkb).sort(1).values.clamp(max=nkb - 1)
        return m.sum(1).int()[None, None], idx.int()[None, None]

    (kn, ki), (fn, fi) = lists(need & ~full), lists(full)
    bm = BlockMask.from_kv_blocks(kn, ki, fn, fi, BLOCK_SIZE=block_size, mask_mod=tree_mask, seq_lengths=(T, T))
    return bm, f"from plan ({err})"


def provider_flex(flex, q, k, v, dout, visible_end, ref, bench, sync, configs, plan_for, deadline):
    """[(label, figures)] per config: fwd / fb ms, compile_s, mask build, errors."""
    T = q.shape[0]
    qh, kh, vh = (t.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for t in (q, k, v))
    dh = dout.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, D]
    unpack = lambda t: t[0].transpose(0, 1)  # noqa: E731  [1, H, T, D] -> [T, H, D]
    results, masks = [], {}
    for label, bs, opts in configs:
        r = {}
        if time.perf_counter() > deadline:
            results.append((label, {"error": "skipped (time budget)"}))
            continue
        try:
            if bs not in masks:
                t0 = time.perf_counter()
                masks[bs] = flex_block_mask(visible_end, T, bs, plan_for)
                sync()
                masks[bs] += ((time.perf_counter() - t0) * 1e3,)
            bm, how, mask_ms = masks[bs]
            r.update(mask=how, mask_ms=mask_ms)

            def fwd(bm=bm, opts=opts):
                return flex(qh, kh, vh, block_mask=bm, enable_gqa=True, kernel_options=opts)

            def fb(fwd=fwd):
                o = fwd()
                return o, torch.autograd.grad(o, (qh, kh, vh), dh)

            t0 = time.perf_counter()
            o, gr = fb()
            sync()
            r["compile_s"] = time.perf_counter() - t0
            r.update(errors(unpack(o), [unpack(x) for x in gr], ref))
            r["fwd_ms"], r["fb_ms"] = bench(fwd), bench(fb)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:200]
            torch.cuda.empty_cache()
        results.append((label, r))
    return results


def varlen_impls():
    """[(name, fn(q, k, v, cu, max_len) -> out)] in order of preference."""
    impls = []
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func

        impls.append((f"flash_attn {flash_attn.__version__}", lambda q, k, v, cu, m: flash_attn_varlen_func(
            q, k, v, cu, cu, m, m, causal=True)))
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}  # a tuple: compared by ==
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        impls.append(("torch varlen_attn", lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, **kw)))
    except ImportError:
        pass
    return impls


def provider_varlen(q, k, v, dout, paths, flat, own, ref, bench):
    impls = varlen_impls()
    if not impls:
        return {"varlen_error": "not available (no flash_attn, no torch.nn.attention.varlen)"}
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    lens = torch.tensor([len(p) for p in paths])
    cu = torch.zeros(len(paths) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu, m = cu.to(q.device), int(lens.max())
    qv = q.detach()[flat].requires_grad_()  # [P, H_q, D]: the unpacked rows
    dv = dout[flat]
    dv_own = dv * own[:, None, None]  # the reference's loss: each packed query once
    errs = []
    for name, f in impls:
        for expand in (False, True) if g > 1 else (False,):
            try:
                kv = [(t.detach().repeat_interleave(g, 1) if expand else t.detach())[flat].requires_grad_()
                      for t in (k, v)]

                def fwd(f=f, kv=kv):
                    return f(qv, kv[0], kv[1], cu, m)

                def fb(fwd=fwd, kv=kv, d=dv):
                    o = fwd()
                    return o, torch.autograd.grad(o, (qv, *kv), d)

                o, gr = fb(d=dv_own)
                out = torch.zeros(T, Hq, D, dtype=o.dtype, device=o.device)
                out[flat[own]] = o[own]
                grads = [torch.zeros(T, *x.shape[1:], dtype=torch.float32, device=x.device).index_add_(
                    0, flat, x.float()) for x in gr]
                if expand:  # the expanded heads' grads back onto the KV heads
                    grads[1:] = [x.view(T, -1, g, D).sum(2) for x in grads[1:]]
                r = {"varlen_impl": name + (" (K/V expanded to H_q)" if expand else "")}
                r.update({f"varlen_{n}": x for n, x in errors(out, grads, ref).items()})
                r["varlen_fwd_ms"], r["varlen_fb_ms"] = bench(fwd), bench(fb)
                if errs:
                    r["varlen_error"] = "; ".join(errs)
                return r
            except Exception as e:
                errs.append(f"{name}{' expanded' if expand else ''}: {type(e).__name__}: {e}"[:160])
    return {"varlen_error": "; ".join(errs)}


# ------------------------------------------------------------------------------- figures

def derive(r: dict, D: int, Hq: int):
    fwd_flop = FWD_FLOP * D * Hq * r["pairs"]
    for p in ("treepo", "treepo_best", "flex", "flex_tuned", "varlen"):
        for kind, flop in (("fwd", fwd_flop), ("fb", fwd_flop * (1 + BWD_FACTOR))):
            ms = r.get(f"{p}_{kind}_ms")
            if isinstance(ms, float):
                r[f"{p}_{kind}_TFLOPs"] = flop / ms / 1e9
    for p in ("treepo", "treepo_best"):
        for kind in ("fwd", "fb"):
            ms, base, flex = r.get(f"{p}_{kind}_ms"), r.get(f"varlen_{kind}_ms"), r.get(f"flex_tuned_{kind}_ms")
            if isinstance(ms, float) and isinstance(base, float):
                r[f"{p}_{kind}_vs_varlen"] = base / ms
                r[f"{p}_{kind}_pct_ideal"] = 100 * base / ms / r["ideal"]
            if isinstance(ms, float) and isinstance(flex, float):
                r[f"{p}_{kind}_vs_flex_tuned"] = flex / ms


def targets(rows: list[dict]) -> dict:
    """The issue's three targets on forward + backward, for the default tile and the best tile:
    {target: {tile: {"met": True / False / None (no figures), "worst": value, "shape": where}}}."""
    out = {}
    checks = {
        "as_fast_as_flex_tuned": (lambda r: not r["no_sharing"], "fb_vs_flex_tuned", lambda x: x >= 1.0),
        "80pct_of_ideal_vs_varlen": (lambda r: not r["no_sharing"], "fb_pct_ideal", lambda x: x >= 80.0),
        "no_sharing_within_10pct_of_varlen": (lambda r: r["no_sharing"], "fb_vs_varlen", lambda x: x >= 1 / 1.1),
    }
    for name, (which, col, ok) in checks.items():
        out[name] = {}
        for tile, p in (("default", "treepo"), ("best", "treepo_best")):
            vals = [(r[f"{p}_{col}"], r["shape"]) for r in rows if which(r) and f"{p}_{col}" in r]
            if not vals:
                out[name][tile] = {"met": None}
                continue
            worst = min(vals)
            out[name][tile] = {"met": all(ok(x) for x, _ in vals), "worst": worst[0], "shape": worst[1]}
    return out


def target_lines(t: dict) -> list[str]:
    def one(d):
        if d["met"] is None:
            return "n/a"
        return f"{'met' if d['met'] else 'NOT met'} (worst {d['worst']:.3g} at {d['shape']})"
    return [f"target {name} (fwd+bwd): default tile {one(v['default'])}; best tile {one(v['best'])}"
            for name, v in t.items()]


# -------------------------------------------------------------------------------------- main

def setup(key, shape, args, heads, dtype, device):
    """(the row's shape figures, the tensors and the fp32 reference), the same on every call."""
    Hq, Hkv, D = heads
    batch = build_batch(shape, args.trees)
    paths = leaf_paths(batch)
    T = batch.tokens
    pairs, path_pairs = pair_counts(batch.visible_end, paths)
    r = {"shape": shape[0], "key": key, "prompt": shape[1], "segment": shape[2], "branching": shape[3],
         "trees": shape[4] * args.trees, "no_sharing": key == NO_SHARING, "T": T, "leaves": batch.n_leaves,
         "path_tokens": batch.leaf_tokens, "pairs": pairs, "path_pairs": path_pairs,
         "ideal_tok": batch.leaf_tokens / T, "ideal": path_pairs / pairs}
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(T, Hq, D, generator=g, device=device, dtype=dtype).requires_grad_()
    k, v = (torch.randn(T, Hkv, D, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    dout = torch.randn(T, Hq, D, generator=g, device=device, dtype=dtype)
    flat = torch.cat(paths).to(device)
    own = owners(flat, T)
    t0 = time.perf_counter()
    ref = path_reference(q, k, v, dout, paths, own)
    r["ref_s"] = time.perf_counter() - t0
    return r, dict(q=q, k=k, v=v, dout=dout, ve=batch.visible_end.to(device), paths=paths, flat=flat, own=own,
                   ref=ref)


def _guard(r, col, f, *a):
    """r.update(f(*a)), or the error string in r[col]."""
    try:
        r.update(f(*a))
    except Exception as e:
        r[col] = f"{type(e).__name__}: {e}"[:200]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_phase(phase, r, c, args, bench, sync, flex, deadline):
    """phase "core": treepo's default tile, flex's defaults, varlen (every shape gets these first);
    "tune": treepo's other tiles, flex's kernel_options (while the time budget lasts)."""
    q, k, v, dout, ve, ref = c["q"], c["k"], c["v"], c["dout"], c["ve"], c["ref"]
    if phase == "core":
        _guard(r, "treepo_error", treepo_default, q, k, v, dout, ve, ref, bench, sync)
    else:
        _guard(r, "treepo_tiles_error", treepo_tiles, q, k, v, dout, ve, ref, bench,
               SMOKE_TILES if args.smoke else TILES, deadline)
    if flex is None:
        r["flex_error"] = r["varlen_error"] = "skipped (CPU)" if args.smoke else "skipped"
        return
    from treepo_kernels.tree_attention import plan_tree_attention

    def plan_for(bs):  # for a block mask built from the plan (square tiles of the mask's block size)
        return plan_tree_attention(ve, bs, bs)

    if phase == "core":
        (_, fr), = provider_flex(flex, q, k, v, dout, ve, ref, bench, sync, [("default", 128, None)], plan_for,
                                 deadline)
        r.update({f"flex_{n}": x for n, x in fr.items()})
        if time.perf_counter() > deadline:
            r["varlen_error"] = "skipped (time budget)"
        else:
            _guard(r, "varlen_error", provider_varlen, q, k, v, dout, c["paths"], c["flat"], c["own"], ref, bench)
    else:
        configs = [cfg for cfg in FLEX_TUNED if cfg[0] in args.flex_configs]
        r["flex_tuned_all"] = dict(provider_flex(flex, q, k, v, dout, ve, ref, bench, sync, configs, plan_for,
                                                 deadline))
    pick_flex_tuned(r)


def pick_flex_tuned(r: dict):
    """flex_tuned_*: the fastest forward + backward among flex's default and the configs tried."""
    found = {"default": {n[5:]: x for n, x in r.items() if n.startswith("flex_") and not n.startswith("flex_tuned")}}
    found.update(r.get("flex_tuned_all", {}))
    ok = [(fr["fb_ms"], label) for label, fr in found.items() if isinstance(fr.get("fb_ms"), float)]
    if ok:
        label = min(ok)[1]
        r.update({f"flex_tuned_{n}": x for n, x in found[label].items() if n != "error"}, flex_tuned_cfg=label)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for bench_train_attention.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32 (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--heads", default=None, help="H_q,H_kv,d (default 32,8,128; 4,2,32 with --smoke)")
    ap.add_argument("--trees", type=int, default=1, help="pack this many copies of each shape's trees")
    ap.add_argument("--shapes", default=None, help="comma-separated keys (default: all)")
    ap.add_argument("--flex-configs", default=",".join(c[0] for c in FLEX_TUNED),
                    help="flex_tuned labels to try (comma-separated)")
    ap.add_argument("--budget-s", type=float, default=135.0,
                    help="after this many seconds, skip the remaining measurements (reported as skipped)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("bench_train_attention needs CUDA (use --smoke with TRITON_INTERPRET=1 to check the script "
                 "on a CPU)")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    table = SMOKE if args.smoke else SHAPES
    keys = args.shapes.split(",") if args.shapes else list(table)
    bad = [x for x in keys if x not in table]
    if bad:
        sys.exit(f"unknown shape(s) {bad}; valid: {', '.join(table)}")
    heads = tuple(int(x) for x in (args.heads or ("4,2,32" if args.smoke else "32,8,128")).split(","))
    if len(heads) != 3 or heads[0] % heads[1]:
        sys.exit(f"--heads {args.heads}: need H_q,H_kv,d with H_kv dividing H_q")
    args.flex_configs = args.flex_configs.split(",") if args.flex_configs else []
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    deadline = time.perf_counter() + args.budget_s
    if cuda:
        import triton.testing

        def bench(f, keep=False):
            """Median ms of do_bench; with keep, (ms, the result of one call)."""
            res = f() if keep else None
            ms = triton.testing.do_bench(f, return_mode="median")
            return (ms, res) if keep else ms

        sync = torch.cuda.synchronize
        flex = make_flex()
    else:
        bench, sync, flex = _cpu_time, (lambda: None), None
    rows = []
    for phase in ("core", "tune"):  # every shape's core figures first, then tuning while time lasts
        for n, key in enumerate(keys):
            if phase == "core":
                rows.append({"shape": table[key][0], "key": key})
            r = rows[n]
            if "error" in r:
                continue
            if time.perf_counter() > deadline:
                r.setdefault("error" if phase == "core" else "tune_error", "skipped (time budget)")
                continue
            try:
                info, tensors = setup(key, table[key], args, heads, dtype, device)
                if phase == "core":
                    r.update(info)
                run_phase(phase, r, tensors, args, bench, sync, flex, deadline)
                derive(r, heads[2], heads[0])
            except Exception as e:  # the shape itself failed (out of memory, ...): report, go on
                r["error" if phase == "core" else "tune_error"] = f"{type(e).__name__}: {e}"[:200]
            tensors = None
            if cuda:
                torch.cuda.empty_cache()
            _write(args, rows, heads, partial=True)
    Hq, Hkv, D = heads
    print(f"attention for training over packed trees, one layer, H_q={Hq} H_kv={Hkv} d={D}, {dtype}, "
          f"{device}; ms = median of do_bench (fwd: forward with grad; fb: forward + backward)")
    print_table(rows, ["shape", "T", "leaves", "plan_ms", "treepo_fwd_ms", "treepo_fb_ms", "treepo_best_fwd_ms",
                       "treepo_best_fb_ms", "treepo_best_fb_tile", "flex_fwd_ms", "flex_fb_ms", "flex_compile_s",
                       "flex_tuned_fwd_ms", "flex_tuned_fb_ms", "flex_tuned_cfg", "varlen_fwd_ms", "varlen_fb_ms"])
    print()
    print_table(rows, ["shape", "ideal_tok", "ideal", "treepo_fwd_vs_varlen", "treepo_fb_vs_varlen",
                       "treepo_fb_pct_ideal", "treepo_best_fb_vs_varlen", "treepo_best_fb_pct_ideal",
                       "treepo_fwd_vs_flex_tuned", "treepo_fb_vs_flex_tuned", "treepo_best_fb_vs_flex_tuned"])
    print()
    print_table(rows, ["shape", "treepo_fwd_TFLOPs", "treepo_fb_TFLOPs", "treepo_best_fb_TFLOPs",
                       "flex_tuned_fb_TFLOPs", "varlen_fb_TFLOPs", "treepo_err", "treepo_gerr", "treepo_tiles_err",
                       "treepo_tiles_gerr", "flex_err", "flex_gerr", "varlen_err", "varlen_gerr", "ref_s", "flex_mask"])
    notes = {}  # (column, message) -> shapes: one line per distinct message
    for r in rows:
        for col in ("error", "tune_error", "treepo_error", "treepo_tiles_error", "treepo_tile_errors", "flex_error",
                    "varlen_error"):
            if r.get(col):
                notes.setdefault((col, str(r[col])), []).append(r["shape"])
    for (col, msg), shapes in notes.items():
        print(f"{col} ({', '.join(shapes)}): {msg}")
    t = targets([r for r in rows if "error" not in r])
    for line in target_lines(t):
        print(line)
    print(json.dumps(_write(args, rows, heads, partial=False, targets=t)))


def make_flex():
    """torch.compile(flex_attention, dynamic=True), with room for one compiled graph per config."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(flex_attention, dynamic=True)


def _write(args, rows, heads, partial, targets=None) -> dict:
    """The result (NaN-free); also written to --out (after every shape: a killed run leaves its rows)."""
    clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
    a = {k: v for k, v in vars(args).items()}
    result = {"bench": "train_attention", "machine": machine(), "args": a, "heads": list(heads), "rows": clean,
              "targets": targets, "partial": partial}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_train_attention.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def _cpu_time(f, keep=False):
    """One call's wall time in ms (the smoke run checks the script, not the speed); with keep,
    (ms, its result)."""
    t = time.perf_counter()
    res = f()
    ms = (time.perf_counter() - t) * 1e3
    return (ms, res) if keep else ms


if __name__ == "__main__":
    main()
