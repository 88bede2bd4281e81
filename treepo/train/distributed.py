"""torchrun / FSDP2 plumbing: the process group, scalar all-reduces, and sharding the model.

One process per rank; `treepo train` alone is a world of one over loopback. gloo on CPU, nccl on
CUDA. FSDP2 (`fully_shard`) wraps each decoder layer and then the root; on CPU the mesh is given
explicitly (without it, gloo + fully_shard on a machine that also has CUDA moves the model to
CUDA: pytorch #132471). See docs/training.md, "FSDP2".
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, or a world of one over loopback."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        # on CUDA, host-side scalars (metrics, token counts) go through gloo and tensors on the GPU
        # through nccl: plain "nccl" cannot reduce CPU tensors
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def all_reduce_scalar(x: float | int, op=dist.ReduceOp.SUM) -> float:
    """A Python number reduced over all ranks (float64 on the host; a collective: every rank calls)."""
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def all_max(x: float | int) -> float:
    return all_reduce_scalar(x, dist.ReduceOp.MAX)


def shard_model(model, world: int, device: torch.device):
    """FSDP2: fully_shard each decoder layer, then the root (bf16 params / fp32 reduce on CUDA)."""
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model
