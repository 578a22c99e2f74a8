"""The loss of one optimizer step's global batch, for logging (not for backward).

Every rank of the SP x DP grid holds different loss tokens of the global batch (SP: other
positions of the same sequences, DP: other sequences; accumulation: other micro-batches), so the
loss of the global batch is the sum of every rank's loss sums over the sum of their token counts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class StepLoss:
    """Accumulates this rank's loss over the micro-steps of one optimizer step.

        step = StepLoss()
        for micro_step in range(gas):
            out = sharded_cross_entropy(...)    # lss_plugin.loss.ShardedLoss
            engine.backward(out.loss); engine.step()
            step.add(out)
        loss, tokens = step.reduce()            # one all-reduce over the world
    """

    def __init__(self) -> None:
        self.loss_sum = 0.0  # over this rank's loss tokens
        self.num_tokens = 0

    def add(self, sharded_loss) -> None:
        """``sharded_loss``: a ``ShardedLoss`` (``local_mean`` over ``num_tokens`` tokens)."""
        self.loss_sum += float(sharded_loss.local_mean) * sharded_loss.num_tokens
        self.num_tokens += int(sharded_loss.num_tokens)

    def reduce(self, group=None) -> tuple[float, int]:
        """(token mean over every rank of ``group`` (default: the world), their token count)."""
        pair = torch.tensor([self.loss_sum, float(self.num_tokens)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(pair, group=group)
        tokens = int(pair[1])
        return (float(pair[0]) / tokens if tokens else 0.0), tokens
