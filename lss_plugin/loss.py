"""Cross entropy over sequence shards, normalised so that double averaging is exact.

Why the normalisation: under LSS a rank's weight gradients also carry the gradients of *other*
ranks' losses (the dK/dV reduce-scatter routes them to the owner of k, v). Weighting gradients by
token counts after backward would weight those borrowed contributions with the wrong count, so
the token weighting inside a sequence-parallel group has to happen in the loss, before backward.
Each rank backpropagates ``loss_sum * N / sequence_tokens`` (N = SP size, sequence_tokens = loss
tokens of the whole SP group): averaging the gradients over the SP group then gives the gradient
of the group's token-mean loss. With equal counts this is exactly the local token mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lss_plugin.comm import all_reduce_sum
from lss_plugin.topology import resolve_sp_group

IGNORE_INDEX = -100


@dataclass
class ShardedLoss:
    loss: torch.Tensor  # what to call .backward() on (differentiable)
    local_mean: torch.Tensor  # mean over this rank's loss tokens (0 when it has none), detached
    num_tokens: int  # loss tokens on this rank
    sequence_tokens: int  # loss tokens on the whole SP group


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """(sum of the cross entropy over counted labels, their count): logits [b, s, V], labels [b, s]. No communication."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    # Half-precision logits are upcast (a long sum in bf16 loses the loss); float64 stays float64.
    compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    loss_sum = F.cross_entropy(
        compute.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return loss_sum, int((labels != ignore_index).sum())


def sharded_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group=None, ignore_index: int = IGNORE_INDEX
) -> ShardedLoss:
    """logits [b, s_local, V], labels [b, s_local] (already shifted, then sharded).

    ``group`` is the SP group, or a ``SequenceGroups`` / ``LSSTopology`` (its whole SP group, also
    under the hybrid LSS x Ulysses); None: one sequence shard, no communication. One scalar
    all-reduce of the token count over ``group``; never NaN, even for a rank or a group without loss tokens.
    """
    loss_sum, num_tokens = cross_entropy_sum(logits, labels, ignore_index)
    group = None if group is None else resolve_sp_group(group)
    sp_size = 1 if group is None else dist.get_world_size(group)
    sequence_tokens = num_tokens
    if sp_size > 1:
        count = torch.tensor([float(num_tokens)], device=logits.device, dtype=torch.float64)
        all_reduce_sum(count, group)
        sequence_tokens = int(count.item())
    loss = loss_sum * (sp_size / sequence_tokens) if sequence_tokens > 0 else loss_sum * 0.0
    local_mean = (loss_sum / num_tokens if num_tokens > 0 else loss_sum * 0.0).detach()
    return ShardedLoss(loss=loss, local_mean=local_mean, num_tokens=num_tokens,
                       sequence_tokens=sequence_tokens)
