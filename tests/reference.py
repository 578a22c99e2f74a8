"""One-process references: the computation LSS must reproduce, on the whole sequence."""
import torch


def reference_attention(q, k, v, causal: bool, scale: float | None = None):
    """Plain softmax attention on full sequences. q [b, L, H, d], k/v [b, L, Hkv, d] -> [b, L, H, d]."""
    b, L, h, d = q.shape
    g = h // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
