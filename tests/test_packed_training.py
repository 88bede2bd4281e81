"""Tree packing changes what the trainer computes, never its result: the update's loss, metrics and
the gradient of every parameter are the same for packing tree, prompt and none (fp32), for every
advantage type, with and without the KL term, on- and off-policy, with micro-batches cut anywhere."""
import copy
import random
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close, tiny_hf_model
from tree_cases import random_tree

from treepo import Engine
from treepo.train.config import TrainConfig
from treepo.train.data import Problem
from treepo.train.rollout import Rollout, RolloutStats, ScoredTree
from treepo.train.trainer import Trainer


def our_model(family="llama_gqa4_untied"):
    return Engine.from_model(tiny_hf_model(family), num_pages=8, page_size=4).model.float().train()


@pytest.fixture(scope="module", autouse=True)
def world_of_one(tmp_path_factory):
    """A gloo group of one through a file store: no port, and nothing in os.environ that later
    trainer subprocesses would inherit (MASTER_PORT, WORLD_SIZE)."""
    if dist.is_initialized():  # another module's group of one
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def bare_trainer(model, ref=None, device="cpu", **cfg):
    """A Trainer without data, engine or sampler: prepare / old_logprobs / update on given trees."""
    t = Trainer.__new__(Trainer)
    t.cfg = TrainConfig(grad_clip=1e9, lr=0.0, **cfg)
    t.rank, t.world, t.device, t.step = 0, 1, torch.device(device), 0
    t.model, t.ref_model, t.autocast_dtype = model, ref, None
    t.tokenizer = SimpleNamespace(pad_token_id=0)
    t.optim = torch.optim.SGD(model.parameters(), lr=0.0)
    t.sched = torch.optim.lr_scheduler.LambdaLR(t.optim, lambda s: 1.0)
    return t


def rollout(seed=0, kinds=("random", "deep", "fallbackk", "star", "fallback0", "tiny", "single")):
    rng = random.Random(seed)
    groups = []
    for kind in kinds:
        tree = random_tree(rng, kind, seg=5)
        rewards = [float(rng.random() < 0.5) for _ in tree.leaves]
        groups.append(ScoredTree(Problem("q", "a", "test"), tree, rewards, list(rewards)))
    return Rollout(groups, RolloutStats())


def step(model, ro, ref=None, device="cpu", **cfg):
    """(metrics, {param name: grad}) of one update on the rollout."""
    t = bare_trainer(model.to(device), ref, device, **cfg)
    batch = t.prepare(ro)
    old = t.old_logprobs(batch) if t.cfg.mini_batches > 1 else None
    m, first = t.update(batch, old)
    return m, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, first


def compare(ro, base, ref_model=None, device="cpu", **cfg):
    results = {}
    for packing in ("none", "prompt", "tree"):
        model = copy.deepcopy(base)
        ref = copy.deepcopy(ref_model) if ref_model is not None else None
        results[packing] = step(model, ro, ref, device, packing=packing, **cfg)
    m0, g0, lp0 = results["none"]
    assert g0 and all(g.abs().sum() > 0 for n, g in g0.items() if "embed" not in n), "no gradient reached a parameter"
    for packing in ("prompt", "tree"):
        m, g, lp = results[packing]
        assert set(g) == set(g0)
        for n in g0:
            scale = g0[n].abs().max().item() + 1e-12
            assert_close(g[n] / scale, g0[n] / scale, atol=2e-5, what=f"{packing} grad {n}")
        assert_close(lp, lp0, atol=2e-5, what=f"{packing} log-probs")
        for k in ("actor/pg_loss", "actor/ppo_kl", "actor/pg_clipfrac", "actor/entropy", "actor/kl"):
            if k in m0:
                assert abs(m[k] - m0[k]) <= 2e-5 * max(1.0, abs(m0[k])), (packing, k, m[k], m0[k])
        assert m["actor/grad_norm"] == pytest.approx(m0["actor/grad_norm"], rel=2e-5)


@pytest.mark.parametrize("advantage", ["tree", "grpo", "rpp"])
def test_update_equal_over_packings(advantage):
    compare(rollout(1), our_model(), advantage=advantage)


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_update_equal_over_packings_with_kl(kl_type):
    base = our_model("qwen2_bias_gqa3")
    ref = copy.deepcopy(base).eval()
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    compare(rollout(2), base, ref_model=ref, kl_coef=0.1, kl_type=kl_type, advantage="grpo")


def test_update_equal_over_packings_off_policy_and_small_micro_batches():
    """Two mini-batches (the old-log-prob pass runs) and a budget smaller than most trees: every
    tree is its own micro-batch and the "none" rows go one or two at a time."""
    compare(rollout(3), our_model("qwen3_norms_gqa4"), mini_batches=2, micro_batch_tokens=40)


def test_update_equal_over_packings_through_the_triton_kernel():
    """The packed update with attention="triton" (the GPU default; here the Triton interpreter)."""
    compare(rollout(6, kinds=("random", "deep", "tiny")), our_model("qwen2_bias_gqa3"), attention="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["triton", "gathered"])
def test_gpu_update_equal_over_packings(attention):
    """On the device, fp32: the packed update (Triton kernel or gathered SDPA) equals the padded one."""
    compare(rollout(1), our_model(), device="cuda", attention=attention, autocast="off")


def test_on_policy_update_skips_the_old_pass_exactly():
    """One mini-batch: logp_old = the update's own log-prob detached gives the same loss and
    gradient as recomputing it in a separate pass."""
    ro, base = rollout(4), our_model()
    m_skip, g_skip, _ = step(copy.deepcopy(base), ro)
    t = bare_trainer(copy.deepcopy(base))
    batch = t.prepare(ro)
    m_old, _ = t.update(batch, t.old_logprobs(batch))
    g_old = {n: p.grad for n, p in t.model.named_parameters() if p.grad is not None}
    for n in g_skip:
        assert_close(g_skip[n], g_old[n], atol=1e-6, what=n)
    assert m_skip["actor/pg_loss"] == pytest.approx(m_old["actor/pg_loss"], abs=1e-6)
    assert m_old["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)


def test_packing_metrics():
    from treepo.train.metrics import packing_metrics

    ro = rollout(5)
    for packing in ("tree", "prompt", "none"):
        t = bare_trainer(our_model(), packing=packing)
        m = packing_metrics(t.prepare(ro))
        trees = [g.tree for g in ro.groups]
        leaf = sum(len(tr.prompt_token_ids) + len(lf.token_ids) for tr in trees for lf in tr.leaves)
        unique = sum(len(tr.prompt_token_ids) + sum(len(n.token_ids) for n in tr.nodes) for tr in trees)
        assert m["packing/leaf_tokens"] == leaf and m["packing/unique_tokens"] == unique
        assert m["packing/ideal_ratio"] == pytest.approx(leaf / unique)
        assert m["packing/padding_avoided"] == m["packing/padded_tokens"] - m["packing/forward_tokens"]
        assert (m["packing/forward_tokens"] == unique) == (packing == "tree")
