"""WeightSync (treepo/integrations/weight_sync.py): an engine's weights equal the training model's
after every sync, whether they are shared, copied, or FSDP2 shards on two ranks (gloo)."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_fixtures import char_tokenizer

from treepo import Engine
from treepo.integrations.weight_sync import WeightSync


def tiny_model(vocab: int, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def engine_equals(engine, state: dict) -> list[str]:
    mine = engine.model.state_dict()
    return [k for k, v in state.items() if k in mine and not torch.equal(mine[k], v)]


def step_elsewhere(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # an optimizer step the engine did not see


def test_shared_tensors_need_no_copy_and_stay_fresh():
    tok = char_tokenizer()
    model = tiny_model(len(tok))
    engine = Engine.from_model(model, tok, kv_cache_memory=2**24)
    step_elsewhere(model)
    assert engine_equals(engine, model.state_dict()) == []  # the same storage: already fresh
    report = WeightSync(engine).sync(model)
    assert report.mode == "shared" and report.copied == 0 and report.shared > 0


def test_separate_tensors_are_copied():
    tok = char_tokenizer()
    model = tiny_model(len(tok))
    engine = Engine.from_model(copy.deepcopy(model), tok, kv_cache_memory=2**24)  # its own tensors
    step_elsewhere(model)
    assert engine_equals(engine, model.state_dict()), "the engine should be stale before the sync"
    report = WeightSync(engine).sync(model)
    assert report.mode == "copied" and report.copied > 0 and report.bytes_copied > 0
    assert engine_equals(engine, model.state_dict()) == []


def test_another_model_is_refused():
    tok = char_tokenizer()
    engine = Engine.from_model(tiny_model(len(tok)), tok, kv_cache_memory=2**24)
    with pytest.raises(ValueError, match="does not match the engine"):
        WeightSync(engine).sync(tiny_model(len(tok), layers=3))


def _fsdp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        tok = char_tokenizer()
        model = tiny_model(len(tok))
        engine = Engine.from_model(copy.deepcopy(model), tok, kv_cache_memory=2**24)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(rank)  # each rank moves its own shard differently
        step_elsewhere(model)
        report = WeightSync(engine).sync(model)  # full_tensor() on every shard: a collective
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        torch.save({"mode": report.mode, "stale": engine_equals(engine, full),
                    "full": full, "engine": engine.model.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_are_gathered_and_copied_on_two_ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_fsdp_worker, args=(os.path.join(d, "init"), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    assert r0["mode"] == r1["mode"] == "copied"
    assert r0["stale"] == [] and r1["stale"] == []
    for k, v in r0["full"].items():  # both ranks' engines hold the same full, updated weights
        assert torch.equal(v, r1["full"][k]) and torch.equal(r0["engine"][k], r1["engine"][k]), k
