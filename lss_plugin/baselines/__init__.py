"""Baselines for the benchmark, all on the same local kernels as LSS.

ring (zigzag, ``ring.py``), TransformerEngine-style all-gather context parallelism
(``allgather_cp.py``), DeepSpeed-Ulysses (``ulysses.py``), the Ulysses x ring hybrid USP
(``usp.py``), and megatron-core core-attention modules for them and for a fused SDPA
one-device / TP attention (``megatron.py``). ``blocks.py`` is their shared block attention.
"""
from lss_plugin.baselines.allgather_cp import allgather_cp_attention
from lss_plugin.baselines.ring import ring_attention

__all__ = ["allgather_cp_attention", "ring_attention"]
