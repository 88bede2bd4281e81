"""bench/bench_train_attention.py: the --smoke run under the Triton interpreter (every smoke shape, the
tree kernel against the per-path fp32 reference, the ideal ratios against values computed here from
the tree shapes), and the targets' met / not met logic on hand-made rows."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_train_attention as bta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (on a CPU, tests/conftest.py sets TRITON_INTERPRET=1)
# the smoke shapes, written out again: (prompt, segment, branching, trees)
SMOKE = {"d2": (24, 16, [2, 2], 1), "d3": (24, 16, [2, 2, 1], 1), "none": (24, 16, [1, 1], 4),
         "prompt": (24, 32, [4], 1)}


def expected(prompt, seg, branching, trees):
    """(T, path tokens, visible pairs packed, visible pairs of the causal paths) of full trees."""
    nodes, n = [], 1
    for b in branching:
        n *= b
        nodes.append(n)  # nodes at depth 1, 2, ...
    leaves, L = nodes[-1], prompt + seg * len(branching)
    unique = prompt + seg * sum(nodes)
    # a token at offset t of a depth-d node sees the prompt, d - 1 whole segments and t + 1 of its own
    pairs = prompt * (prompt + 1) // 2 + sum(n_d * (seg * (prompt + d * seg) + seg * (seg + 1) // 2)
                                             for d, n_d in enumerate(nodes))
    return trees * unique, trees * leaves * L, trees * pairs, trees * leaves * L * (L + 1) // 2


@pytest.fixture(scope="module")
def smoke():
    # the CPU run (fp32 under the interpreter), also on a machine with a GPU
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.abspath(ROOT), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_train_attention.py"), "--smoke"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_smoke_rows_cover_the_shapes_and_match_the_reference(smoke):
    assert smoke["bench"] == "train_attention" and "cores" in smoke["machine"] and smoke["args"]["smoke"]
    rows = {r["key"]: r for r in smoke["rows"]}
    assert sorted(rows) == sorted(SMOKE)
    for key, r in rows.items():
        assert "error" not in r and "treepo_error" not in r, r
        assert r["treepo_err"] < 1e-4 and r["treepo_gerr"] < 1e-4, (key, r["treepo_err"], r["treepo_gerr"])
        assert r["treepo_tiles_err"] < 1e-4 and r["treepo_tiles_gerr"] < 1e-4, key
        assert "treepo_tile_errors" not in r, r["treepo_tile_errors"]
        for col in ("treepo_fwd_ms", "treepo_fb_ms", "treepo_best_fwd_ms", "treepo_best_fb_ms", "plan_ms"):
            assert r[col] > 0, (key, col)
        assert r["flex_error"] == r["varlen_error"] == "skipped (CPU)"
        assert "treepo_fb_vs_varlen" not in r  # no baseline: no speed-up figure


def test_smoke_ideal_ratios_are_the_tree_shapes(smoke):
    for r in smoke["rows"]:
        T, path_tokens, pairs, path_pairs = expected(*SMOKE[r["key"]])
        assert (r["T"], r["path_tokens"], r["pairs"], r["path_pairs"]) == (T, path_tokens, pairs, path_pairs)
        assert r["ideal_tok"] == pytest.approx(path_tokens / T)
        assert r["ideal"] == pytest.approx(path_pairs / pairs)
    assert next(r for r in smoke["rows"] if r["key"] == "none")["ideal"] == 1.0
    assert smoke["targets"] == {name: {"default": {"met": None}, "best": {"met": None}}
                                for name in ("as_fast_as_flex_tuned", "80pct_of_ideal_vs_varlen",
                                             "no_sharing_within_10pct_of_varlen")}


def test_targets_met_and_not_met():
    def row(shape, no_sharing, treepo, best, flex, varlen, ideal):
        r = {"shape": shape, "no_sharing": no_sharing, "pairs": 10**6, "ideal": ideal, "treepo_fb_ms": treepo,
             "treepo_best_fb_ms": best, "flex_tuned_fb_ms": flex, "varlen_fb_ms": varlen}
        bta.derive(r, 128, 32)
        return r

    rows = [row("a", False, 10.0, 8.0, 9.0, 20.0, 2.0),  # default: 0.9x flex, 100% of ideal; best: 1.125x, 125%
            row("b", False, 10.0, 10.0, 12.0, 15.0, 2.0),  # 1.2x flex, 75% of ideal
            row("n", True, 11.5, 10.5, 11.0, 10.0, 1.0)]  # 1/1.15 and 1/1.05 of varlen
    assert rows[0]["treepo_fb_pct_ideal"] == pytest.approx(100.0) and rows[1]["treepo_fb_vs_flex_tuned"] == 1.2
    assert rows[0]["treepo_fb_TFLOPs"] == pytest.approx(4 * 128 * 32 * 10**6 * 3.5 / 10.0 / 1e9)
    t = bta.targets(rows)
    flex, ideal, none = (t[k] for k in ("as_fast_as_flex_tuned", "80pct_of_ideal_vs_varlen",
                                        "no_sharing_within_10pct_of_varlen"))
    assert flex["default"] == {"met": False, "worst": 0.9, "shape": "a"}
    assert flex["best"]["met"] and flex["best"]["worst"] == pytest.approx(1.125)
    assert not ideal["default"]["met"] and ideal["default"]["worst"] == pytest.approx(75.0)
    assert not ideal["best"]["met"] and ideal["best"]["shape"] == "b"
    assert not none["default"]["met"] and none["best"]["met"]
    lines = bta.target_lines(t)
    assert len(lines) == 3 and "default tile NOT met (worst 0.9 at a)" in lines[0]


def _fake_flex(q, k, v, block_mask=None, enable_gqa=False, kernel_options=None):
    """flex_attention's contract in dense fp32 math: the mask from the block mask's own mask_mod."""
    T = q.shape[2]
    i = torch.arange(T, device=q.device)
    mask = block_mask.mask_mod(0, 0, i[:, None], i[None, :])
    g = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(g, 1) for t in (k, v))
    s = (q.float() @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vf).to(q.dtype)


def _fake_varlen(gqa: bool):
    """Causal attention per cu_seqlens sequence (SDPA); without gqa it refuses H_kv < H_q."""
    def f(q, k, v, cu, m):
        if not gqa and k.shape[1] != q.shape[1]:
            raise RuntimeError("no GQA here")
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            o = torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, enable_gqa=True)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)
    return f


def test_gpu_paths_with_stand_ins(monkeypatch):
    """The flex / varlen plumbing that only runs on a GPU (layouts, block masks, the owner-masked
    dout, picking flex_tuned, the derived figures), with stand-ins for flex and varlen (fp32)."""
    monkeypatch.setattr(bta, "varlen_impls", lambda: [("stand-in", _fake_varlen(True))])
    args = SimpleNamespace(trees=1, smoke=True, flex_configs=[c[0] for c in bta.FLEX_TUNED])
    r, c = bta.setup("d3", bta.SMOKE["d3"], args, (4, 2, 32), torch.float32, DEVICE)
    deadline = time.perf_counter() + 600
    for phase in ("core", "tune"):
        bta.run_phase(phase, r, c, args, bta._cpu_time, lambda: None, _fake_flex, deadline)
    bta.derive(r, 32, 4)
    for col in ("treepo_err", "treepo_gerr", "flex_err", "flex_gerr", "varlen_err", "varlen_gerr"):
        assert r[col] < 1e-4, (col, r[col])
    assert r["flex_mask"] == "create_block_mask" and "flex_error" not in r and "varlen_error" not in r
    assert r["varlen_impl"] == "stand-in"
    assert sorted(r["flex_tuned_all"]) == sorted(args.flex_configs)
    assert all(fr["err"] < 1e-4 and fr["fb_ms"] > 0 for fr in r["flex_tuned_all"].values())
    best = min([r["flex_fb_ms"]] + [fr["fb_ms"] for fr in r["flex_tuned_all"].values()])
    assert r["flex_tuned_fb_ms"] == best and r["flex_tuned_cfg"] in ["default"] + args.flex_configs
    assert r["treepo_fb_vs_varlen"] == r["varlen_fb_ms"] / r["treepo_fb_ms"]
    assert r["treepo_fb_pct_ideal"] == pytest.approx(100 * r["treepo_fb_vs_varlen"] / r["ideal"])
    assert r["treepo_fb_vs_flex_tuned"] == r["flex_tuned_fb_ms"] / r["treepo_fb_ms"]


def test_varlen_without_gqa_expands_kv(monkeypatch):
    """A varlen impl that refuses H_kv < H_q is retried with K/V repeated to H_q, and the grads of
    the repeated heads are summed back onto the KV heads."""
    monkeypatch.setattr(bta, "varlen_impls", lambda: [("stand-in", _fake_varlen(False))])
    args = SimpleNamespace(trees=1, smoke=True)
    _, c = bta.setup("prompt", bta.SMOKE["prompt"], args, (6, 2, 16), torch.float32, DEVICE)
    r = bta.provider_varlen(c["q"], c["k"], c["v"], c["dout"], c["paths"], c["flat"], c["own"], c["ref"],
                            bta._cpu_time)
    assert r["varlen_impl"] == "stand-in (K/V expanded to H_q)" and "no GQA here" in r["varlen_error"]
    assert r["varlen_err"] < 1e-5 and r["varlen_gerr"] < 1e-5


def test_block_mask_from_the_plan_is_create_block_mask():
    from treepo_kernels.tree_attention import plan_tree_attention

    for key in ("d3", "prompt"):
        ve = bta.build_batch(bta.SMOKE[key], 1).visible_end
        T = ve.shape[0]
        for bs in (16, 32):
            plan_for = lambda b: plan_tree_attention(ve, b, b)  # noqa: E731
            (a, how_a), (b, how_b) = (bta.flex_block_mask(ve, T, bs, plan_for, build) for build in ("auto", "plan"))
            assert how_a == "create_block_mask" and how_b.startswith("from plan")
            assert torch.equal(a.to_dense(), b.to_dense())
            for f in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (key, bs, f)
