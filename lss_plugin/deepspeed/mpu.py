"""An ``mpu`` (model-parallel unit) that describes the LSS grid to DeepSpeed with real groups.

DeepSpeed 0.19.8 asks an mpu for four kinds of group (found by reading ``deepspeed/runtime``
and ``deepspeed/utils/groups.py``):

==========================  ====================================  ==============================
DeepSpeed asks for          used for                              LSS answer
==========================  ====================================  ==============================
data parallel               batch size, data sampler, clip-norm   the LSS DP group (ranks that
                            averaging (``runtime/utils.py``)       see different sequences)
sequence parallel           Ulysses bookkeeping, the *divisor*    the LSS SP group
                            of the gradient reduction
sequence data parallel      ZeRO partitioning, gradient           every rank of the SP x DP grid
                            all-reduce / reduce-scatter,
                            initial parameter broadcast
model (= tensor) parallel   gradient-norm sum in clipping,        a group of this rank alone:
                            checkpoint file names (mp_rank_XX)    LSS replicates every parameter
pipeline parallel           checkpoint metadata                   a group of this rank alone
==========================  ====================================  ==============================

Why the model-parallel group is this rank alone: DeepSpeed sums the squared gradient norm over
it (``clip_grad_norm_`` and ZeRO's ``get_grad_norm_direct``), counting replicated parameters only
on model-parallel rank 0. LSS parameters are replicated over SP, so a size-1 group counts each
parameter once, and the checkpoint keeps one model file (``mp_rank_00``) that loads under any SP
size. The class deliberately has no ``initialize_sequence_parallel`` method: DeepSpeed takes
that as the mark of its own Ulysses mpu and then ignores the data-parallel and model-parallel
answers (``groups._get_data_parallel_group`` returns None).

Under the hybrid LSS x Ulysses (the block's ``"ulysses_size"``) the sequence-parallel answer is still
the whole SP group of N ranks: every rank still projects, and takes gradients for, its own L/N tokens,
so the gradient average over SP x DP and ZeRO's partitioning are unchanged. The Ulysses and LSS
sub-groups only carry attention's all-to-all and gather; DeepSpeed never sees them.
"""
from __future__ import annotations

import torch.distributed as dist

from lss_plugin.runtime import as_timedelta
from lss_plugin.topology import LSSTopology


class LSSMpu:
    """The LSS topology in the vocabulary DeepSpeed's ``mpu`` argument expects.

    Construction is collective (it creates the size-1 model-parallel groups and the whole-grid
    group): every rank must build it, in the same order relative to other ``new_group`` calls.
    """

    def __init__(self, topology: LSSTopology):
        self.topology = topology
        world, rank = dist.get_world_size(), dist.get_rank()
        timeout = as_timedelta(topology.timeout_s)
        self._grid_ranks = list(range(world))
        # The whole grid. A fresh group rather than WORLD, so that its timeout is the LSS one and
        # destroying it never touches the default group.
        self._grid_group = dist.new_group(self._grid_ranks, timeout=timeout, group_desc="lss_sp_dp")
        # new_group is collective over the world: every rank creates every singleton group.
        self._self_group = None
        created = [self._grid_group]
        for r in range(world):
            group = dist.new_group([r], timeout=timeout, group_desc=f"lss_mp_{r}")
            created.append(group)
            if r == rank:
                self._self_group = group
        self._created = tuple(created)

    # -- data parallel: ranks that see different sequences ------------------------------------
    def get_data_parallel_group(self):
        return self.topology.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.topology.dp_ranks)

    # -- sequence parallel: ranks that share one sequence --------------------------------------
    def get_sequence_parallel_group(self):
        return self.topology.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.topology.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.topology.sp_rank

    # -- sequence x data parallel: every replica of the parameters -----------------------------
    def get_sequence_data_parallel_group(self):
        return self._grid_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return len(self._grid_ranks)

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self._grid_group)

    # -- model (tensor) parallel: none, each rank holds whole parameters -----------------------
    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()

    # -- pipeline parallel: none ---------------------------------------------------------------
    def get_pipeline_model_parallel_group(self):
        return self._self_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank

    def destroy(self) -> None:
        """Destroy the groups this mpu created (the topology's own groups are not touched).

        DeepSpeed keeps the last engine's mpu in a module global (``deepspeed.utils.groups.mpu``)
        and asks it again when a later engine has none: that reference is dropped too.
        """
        from deepspeed.utils import groups

        if getattr(groups, "mpu", None) is self:
            groups.mpu = None
        if dist.is_initialized():
            for group in self._created:
                if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
                    dist.destroy_process_group(group)
        self._created = ()

    def __repr__(self) -> str:
        t = self.topology
        return f"LSSMpu(sp={t.sp_size}, dp={t.dp_size}, rank={t.rank}, sp_rank={t.sp_rank}, dp_rank={t.dp_rank})"
