"""Behaviour check for refactors: seeded trees (uniform, logprob, sequential) and seeded n=4
generation on a tiny random Llama, printed as JSON. Run it in two checkouts and compare:

    python bench/equivalence_check.py torch > a.json   # or: cpu (the C++ backend)
    cmp a.json b.json
"""
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from treepo import Engine, SamplingParams, TreeConfig, TreeSampler

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=5, bos_token_id=1)
m = LlamaForCausalLM(cfg).eval()
eng = Engine.from_model(m, attention_backend=sys.argv[1])
prompts = [[1] + torch.randint(6, 97, (n,)).tolist() for n in (5, 9, 17)]
out = {}
for name, tc in {"tree": TreeConfig(segment_len=6, max_depth=4, max_width=8, branch_factor=2, seed=3),
                 "logprob": TreeConfig(segment_len=5, max_depth=3, max_width=6, branch_factor=2,
                                       branch_policy="logprob", seed=1),
                 "seq": TreeConfig.sequential(6, 20, seed=2)}.items():
    trees = TreeSampler(eng, tc).sample(prompts, SamplingParams(temperature=1.0, seed=0))
    out[name] = [[(lf.token_ids, lf.path, lf.finish_reason, lf.from_fallback, [round(x, 6) for x in lf.logprobs])
                  for lf in t.leaves] + [t.stats.processed_tokens, t.stats.prefill_tokens, t.stats.fallbacks]
                 for t in trees]
gen = eng.generate(prompts, SamplingParams(n=4, temperature=0.8, top_p=0.9, max_tokens=12, seed=7))
out["gen"] = [[(c.token_ids, c.finish_reason, [round(x, 6) for x in c.logprobs]) for c in cs] for cs in gen]
print(json.dumps(out))
