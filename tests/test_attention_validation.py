"""Bad input to lss_attention fails on every rank with the values named, at the call's verdict (one
fixed-size all-gather, ``lss_plugin.verdict``) before any variable-size collective."""
import pytest
import torch
import torch.distributed as dist

import lss_plugin
from tests.distributed import run_ranks


def _qkv(b=1, s=4, h=4, hkv=2, d=8, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype)


def test_without_topology_or_group_is_a_clear_error():
    lss_plugin.destroy_topology()
    with pytest.raises(RuntimeError, match="init_topology"):
        lss_plugin.lss_attention(*_qkv())


BAD_CALLS = {
    "heads": (lambda: _qkv(h=6, hkv=4), {}, "query heads \\(6\\) must be a multiple of key/value heads \\(4\\)"),
    "dtype": (lambda: (_qkv()[0].double(),) + _qkv()[1:], {}, "dtypes differ"),
    "shape": (lambda: (torch.randn(1, 4, 4, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)), {},
              "disagree on batch, local length or head dim"),
    "kv": (lambda: (torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)), {},
           "k and v shapes differ"),
    "odd_balanced": (lambda: _qkv(s=5), {"layout": "balanced"}, "local sequence length 5 cannot come from layout"),
    "layout": (lambda: _qkv(), {"layout": "zigzag"}, "layout must be one of"),
    "mode": (lambda: _qkv(), {"kv_backward": "drop"}, "kv_backward must be one of"),
    "grad_dtype": (lambda: _qkv(dtype=torch.bfloat16), {"kv_grad_dtype": "bf16"}, "kv_grad_dtype must be one of"),
    "chunk": (lambda: _qkv(), {"kv_head_chunk": 3}, r"kv_head_chunk must be an integer in \[1, 2\]"),
    "rank3": (lambda: (torch.randn(4, 4, 8),) + _qkv()[1:], {}, "must be a 4-D tensor"),
    "budget": (lambda: _qkv(), {"kv_head_chunk": "auto", "kv_buffer_mib": 1e-6},
               "kv_buffer_mib / LSS_KV_BUFFER_MIB = 1e-06 MiB is below"),
}


def _bad_calls():
    lss_plugin.init_topology(dist.get_world_size())
    messages = {}
    for name, (make, kwargs, _) in BAD_CALLS.items():
        try:
            lss_plugin.lss_attention(*make(), **kwargs)
            messages[name] = None
        except (ValueError, RuntimeError) as e:
            messages[name] = str(e)
    # The group must still be usable: nobody is stuck inside a collective.
    t = torch.ones(1)
    dist.all_reduce(t)
    return messages, t.item()


def test_bad_input_raises_on_every_rank_before_any_collective():
    import re

    for messages, total in run_ranks(_bad_calls, 2, timeout_s=120):
        assert total == 2.0
        for name, (_, _, pattern) in BAD_CALLS.items():
            assert messages[name] is not None and re.search(pattern, messages[name]), (name, messages[name])


def _mismatched(kind):
    lss_plugin.init_topology(dist.get_world_size())
    rank = dist.get_rank()
    q, k, v = _qkv(s=4 + 2 * rank if kind == "shape" else 4)
    layout = ("contiguous", "balanced")[rank] if kind == "layout" else "contiguous"
    try:
        lss_plugin.lss_attention(q, k, v, causal=True, layout=layout)
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", ["shape", "layout"])
def test_ranks_that_disagree_all_fail_instead_of_hanging(kind):
    for message in run_ranks(_mismatched, 2, kind, timeout_s=120):
        assert message is not None and "sequence-parallel group disagree" in message
        assert ("s_local" if kind == "shape" else "layout") in message
