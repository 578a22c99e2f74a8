"""Baseline sequence-parallel attentions for the benchmark: ring attention and DeepSpeed-Ulysses."""
from lss_plugin.baselines.ring import ring_attention

__all__ = ["ring_attention"]
