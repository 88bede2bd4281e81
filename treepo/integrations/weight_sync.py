"""WeightSync: keep a treepo Engine's weights equal to a training model's before every generation.

Another project's trainer owns the model and updates it in place (an optimizer step); the engine
must never sample with stale weights. `WeightSync(engine).sync(model)` goes over the engine's
tensors by name (Hugging Face names, as Engine.from_model loads them) and, for each one:

- shared: the training tensor and the engine's are the same storage (same data pointer, dtype and
  shape): nothing to do, the in-place update is already there. Engine.from_model on a plain,
  unwrapped model in the engine's dtype and device gives this for every tensor.
- copied: otherwise (another dtype or device, a DTensor shard of FSDP2 gathered with
  full_tensor(), parameters gathered by a DeepSpeed ZeRO-3 context, a tensor replaced since the
  engine was built): copied into the engine's tensor.

So a sync is a pointer check per tensor when everything is shared and a full copy otherwise;
either way the engine holds exactly the model's current values afterwards (tested both ways). The
engine's prepacked CPU GEMMs (treepo/engine/packed_model.py) repack by themselves when a tensor's
version changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WeightSync", "SyncReport"]


@dataclass
class SyncReport:
    shared: int = 0  # tensors that are the model's own storage
    copied: int = 0  # tensors copied from the model
    bytes_copied: int = 0

    @property
    def mode(self) -> str:
        return "shared" if self.copied == 0 else ("copied" if self.shared == 0 else "mixed")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP2 DTensor: gather (a collective)


class WeightSync:
    """`WeightSync(engine).sync(model) -> SyncReport`: the engine's weights made equal to `model`'s
    (a transformers causal LM or a treepo CausalLM with Hugging Face parameter names)."""

    def __init__(self, engine):
        self.engine = engine
        self.syncs = 0
        self.last: SyncReport | None = None

    @torch.no_grad()
    def sync(self, model) -> SyncReport:
        if hasattr(model, "peft_config"):
            raise ValueError("WeightSync: a PEFT (LoRA) model; merge its adapters first (model.merge_and_unload()) "
                             "or give the engine the merged weights: the engine runs plain weights only")
        src = model.state_dict()
        dst = self.engine.model.state_dict()
        tied = bool(self.engine.config.tie_word_embeddings)
        missing = [k for k in dst if k not in src and not (tied and k == "lm_head.weight")]
        unexpected = [k for k in src if k not in dst and not k.endswith("rotary_emb.inv_freq")
                      and not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"WeightSync: the model's state dict does not match the engine's: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]} (is it the model the engine was built from?)")
        report = SyncReport()
        for name, d in dst.items():
            if name not in src:
                continue
            s = _full(src[name])
            if s.shape != d.shape:
                raise ValueError(f"WeightSync: {name} has shape {tuple(s.shape)} in the model, "
                                 f"{tuple(d.shape)} in the engine")
            if s.data_ptr() == d.data_ptr() and s.dtype == d.dtype and s.device == d.device:
                report.shared += 1
                continue
            d.copy_(s.to(device=d.device, dtype=d.dtype))
            report.copied += 1
            report.bytes_copied += d.numel() * d.element_size()
        self.syncs += 1
        self.last = report
        return report
