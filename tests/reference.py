"""One-process references: the computation LSS must reproduce, on the whole sequence."""
import torch

from lss_plugin.masks import MaskSpec, dense_hidden


def reference_attention(q, k, v, causal: bool, scale: float | None = None, *, bounds=None, window=None, chunk=None,
                        softcap=None, sinks=None):
    """Plain softmax attention on full sequences. q [b, L, H, d], k/v [b, L, Hkv, d] -> [b, L, H, d].

    Masks as ``lss_plugin.masks`` defines them, densely: ``bounds`` (packed documents, global
    positions), ``window`` (left, right), ``chunk``; ``softcap`` caps the scaled scores before the
    mask; ``sinks`` [H] is one more logit per head in every row's softmax, carrying no value."""
    b, L, h, d = q.shape
    g = h // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bounds is not None or window is not None or chunk is not None:
        hidden = dense_hidden(L, tuple(bounds or (0, L)), MaskSpec(causal, window, chunk), q.device)
        scores = scores.masked_fill(hidden, float("-inf"))
    elif causal:
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    if sinks is None:
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
    sink = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, L, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :L]  # the sink's column carries no value
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
