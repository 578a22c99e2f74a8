"""GQA/MQA head bookkeeping for local attention: ``g = H / Hkv`` query heads share each K/V head.

Shared by LSS's own local attention (``lss_plugin.attention``) and the baselines' block attention
(``lss_plugin.baselines.blocks``), so both treat grouped heads the same way. Tensors are ``[b, heads, n, ...]``.
"""
from __future__ import annotations

import torch


def fold_query_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv*g, n, ...] -> [b, hkv, g*n, ...]: GQA query groups become extra query rows (K/V are not copied)."""
    if g == 1:
        return x
    b, h, n = x.shape[:3]
    return x.reshape(b, h // g, g * n, *x.shape[3:])


def unfold_query_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv, g*n, ...] -> [b, hkv*g, n, ...]: the inverse of ``fold_query_groups``."""
    if g == 1:
        return x
    b, hkv, gn = x.shape[:3]
    return x.reshape(b, hkv * g, gn // g, *x.shape[3:])


def repeat_kv_heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv, n, d] -> [b, hkv*g, n, d]: each K/V head repeated for the g query heads of its group."""
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def sum_head_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv*g, n, d] -> [b, hkv, n, d]: the gradient of ``repeat_kv_heads`` (sum over each group)."""
    if g == 1:
        return x
    b, h, n, d = x.shape
    return x.view(b, h // g, g, n, d).sum(2)
