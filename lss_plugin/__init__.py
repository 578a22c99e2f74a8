"""LSS (Long Short-Sequence) sequence parallelism: exact attention over sequences split across ranks."""
from lss_plugin.attention import LSSAttention, lss_attention
from lss_plugin.comm import record_collectives
from lss_plugin.documents import cu_seqlens_from_eod, cu_seqlens_from_position_ids
from lss_plugin.grads import average_gradients, reduce_loss
from lss_plugin.loss import ShardedLoss, sharded_cross_entropy
from lss_plugin.options import AttentionSettings
from lss_plugin.sharding import LAYOUTS, local_positions, shard_sequence, unshard_sequence
from lss_plugin.topology import (
    LSSTopology,
    ParallelDims,
    SequenceGroups,
    destroy_topology,
    get_topology,
    init_topology,
    is_topology_initialized,
)

__all__ = [
    "LAYOUTS", "AttentionSettings", "LSSAttention", "ShardedLoss", "average_gradients", "reduce_loss", "sharded_cross_entropy",
    "LSSTopology", "ParallelDims", "SequenceGroups", "cu_seqlens_from_eod", "cu_seqlens_from_position_ids", "destroy_topology",
    "get_topology",
    "init_topology", "is_topology_initialized", "local_positions", "lss_attention", "record_collectives",
    "shard_sequence", "unshard_sequence",
]
__version__ = "0.1.0"
