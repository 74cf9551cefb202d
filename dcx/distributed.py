"""What dcx does under torch.distributed (torchrun): every rank runs the same code, and where
ranks must agree (masks, a model's start, a teacher) they take rank 0's tensors byte for byte.
"""

import itertools

import torch
from torch import Tensor, nn

__all__ = ["broadcast_", "broadcast_model_", "world"]


def world() -> tuple[int, int]:
    """(rank, world size) inside an initialized torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_(tensor: Tensor) -> Tensor:
    """Rank 0's values into `tensor` on every rank, in place, as bytes: one rule for every
    dtype (gloo has no bool, nor some integer widths). Nothing outside torch.distributed."""
    if world()[1] == 1:
        return tensor
    import torch.distributed as dist

    with torch.no_grad():
        data = tensor.detach()
        dense = data.contiguous()
        dist.broadcast(dense.reshape(-1).view(torch.uint8), src=0)
        if dense.data_ptr() != data.data_ptr():
            data.copy_(dense)
    return tensor


def broadcast_model_(model: nn.Module) -> nn.Module:
    """Every rank takes rank 0's parameters and buffers (masks, codebooks and labels among
    them). Returns the model."""
    if world()[1] > 1:
        for t in itertools.chain(model.parameters(), model.buffers()):
            broadcast_(t)
    return model
