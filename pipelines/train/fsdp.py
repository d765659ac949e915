"""FSDP2 sharding of the training model over the flattened DP x CP mesh.

Parameters are sharded with ``fully_shard`` over the flattened DP x CP mesh
(`pipelines.runtime.Runtime.shard_mesh`): each decoder layer, the vision tower, then the root
(the module that computes the loss, so the root parameters, LM head included, are unsharded
while the loss runs). Gradients must be the **sum** over all DP x CP ranks of the gradients of
(local loss sum / global supervised count): CP ranks hold parts of the same pack, so averaging
would divide by CP. FSDP2 averages by default; every FSDP module gets
``set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)``. Verified
with torch 2.13 (CPU, gloo, 2 ranks): the default gives half the summed gradient; the divide
factor alone on the root changes nothing (it applies to the module's own parameter group only);
the factor on every module without forcing sums selects ``ReduceOp.PREMUL_SUM``, which gloo
rejects ("Cannot use ReduceOp.PREMUL_SUM with Gloo"); with both, the gradients equal the summed
ones exactly (ratio 1.0). So FSDP2 runs on CPU too: there is no replicated fallback. Mixed
precision (bf16 compute): ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over
fp32 master parameters (the optimizer state stays fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.runtime import Runtime


def shard_model(
    root: nn.Module, units: list[nn.Module], runtime: Runtime, dtype: torch.dtype
) -> None:
    """FSDP2 over the flattened DP x CP mesh: each of `units` (decoder layers, the vision
    tower), then `root`; gradients summed, not averaged (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32
    )
    for unit in [*units, root]:
        fully_shard(unit, mesh=runtime.shard_mesh, mp_policy=policy)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
