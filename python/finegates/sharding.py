"""Gates outside their block's forward under FSDP2.

Under FSDP2 a gate vector is a shard (a ``DTensor``) except while its block runs. :func:`full_gates`
gathers every gate vector whole for code that reads or sets gates between steps (the compression
report, the budget's exact closure) and writes changes back into each process's shard. Without
sharded gates it does nothing, so the library calls it everywhere it reads gates between steps.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .gates import Gates

__all__ = ["full_gates"]


@contextlib.contextmanager
def full_gates(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Every gate vector of ``model`` whole for the duration (FSDP2 shards gathered; a no-op
    otherwise); with ``write_back``, values set meanwhile go back into each process's shard. Under
    FSDP2 every process must enter (the gather is collective)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = [(g, g.theta) for g in model.modules() if isinstance(g, Gates) and isinstance(g.theta, DTensor)]
    for g, shard in sharded:
        g._parameters["theta"] = nn.Parameter(shard.detach().full_tensor(), requires_grad=False)
    try:
        yield
    finally:
        with torch.no_grad():
            for g, shard in sharded:
                if write_back:
                    whole = g._parameters["theta"].detach()
                    shard.copy_(distribute_tensor(whole, shard.device_mesh, shard.placements, src_data_rank=None))
                g._parameters["theta"] = shard
