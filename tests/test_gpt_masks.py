"""The bundled GPT (lss_plugin.models.gpt) with sliding windows and attention sinks (issue 28).

Reference: the same model (same weights) in one process, which computes the masked attention densely
(``_reference_attention``: SDPA with the window's boolean mask; with sinks an explicit softmax whose
denominator has one extra column per head). That reference is itself checked against the formula
written out row by row. LSS runs at SP = 4, SP = 2 x DP = 2 and SP = 4 as Ulysses 2 x LSS 2 on 4 ranks,
float64: the step's global loss and every parameter's gradient after ``average_gradients`` (the sinks'
included) within 1e-10 of the reference's (max abs difference over the reference's largest value).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lss_plugin
from lss_plugin.models.gpt import FULL, SLIDING, GPT, GPTConfig, LSSAttentionOptions, _reference_attention
from lss_plugin.sharding import local_token_indices
from tests.distributed import run_ranks

SEQ, BATCH, VOCAB = 32, 4, 64  # SEQ divisible by 2 * 4 (balanced layout at SP = 4): s_local 8 or 16
TOL = 1e-10


# ---------------------------------------------------------------------------------------------
# One process: the configuration and the reference attention

def test_config_windows_per_layer_and_refusals():
    c = GPTConfig(num_layers=3, window=4)
    assert c.layer_types == (SLIDING,) * 3 and [c.layer_window(i) for i in range(3)] == [(3, 0)] * 3
    alt = GPTConfig(num_layers=2, window=8, layer_types=[SLIDING, FULL])
    assert alt.layer_types == (SLIDING, FULL) and [alt.layer_window(i) for i in range(2)] == [(7, 0), None]
    assert GPTConfig(num_layers=2).layer_types == (FULL, FULL)
    model = GPT(GPTConfig(num_layers=2, hidden_size=16, num_heads=4, window=3, sinks=True))
    sinks = {n: p for n, p in model.named_parameters() if n.endswith("attn.sinks")}
    assert sorted(sinks) == ["blocks.0.attn.sinks", "blocks.1.attn.sinks"]
    assert all(p.shape == (4,) and p.requires_grad and not p.any() for p in sinks.values())
    assert not any(n.endswith("sinks") for n, _ in GPT(GPTConfig(num_layers=1, hidden_size=16)).named_parameters())
    for kwargs, message in (
        (dict(window=0), "window must be a positive number of keys (sliding_window), got 0"),
        (dict(window=True), "window must be a positive number of keys (sliding_window), got True"),
        (dict(num_layers=2, layer_types=(SLIDING, FULL)), "has 'sliding_attention' layers but window is None"),
        (dict(num_layers=2, window=4, layer_types=(SLIDING,)), "layer_types must be 2 (num_layers)"),
        (dict(num_layers=1, window=4, layer_types=("chunked_attention",)), "got ('chunked_attention',)"),
    ):
        with pytest.raises(ValueError) as err:
            GPTConfig(**kwargs)
        assert message in str(err.value), (kwargs, str(err.value))


def _rowwise(q, k, v, window, sinks, bounds):
    """The definition, one query at a time: keys j of i's document with i - left <= j <= i, weights
    exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)). q [b, s, H, d], k, v [b, s, Hkv, d]."""
    b, s, h, d = q.shape
    rep = h // k.shape[2]
    out = torch.zeros_like(q)
    for i in range(s):
        doc = max(x for x in bounds if x <= i)
        lo = doc if window is None else max(doc, i - window[0])
        for head in range(h):
            keys, values = k[:, lo:i + 1, head // rep], v[:, lo:i + 1, head // rep]  # [b, n, d]
            w = torch.exp(torch.einsum("bd,bnd->bn", q[:, i, head], keys) / d ** 0.5)
            denom = w.sum(-1, keepdim=True) + (0.0 if sinks is None else torch.exp(sinks[head]))
            out[:, i, head] = torch.einsum("bn,bnd->bd", w / denom, values)
    return out


@pytest.mark.parametrize("window, sinks, docs", [
    (None, False, False), ((3, 0), False, False), ((3, 0), True, False), ((0, 0), True, False),
    (None, True, True), ((4, 0), True, True), ((40, 0), True, False)])
def test_reference_attention_is_the_definition(window, sinks, docs):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 12, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 12, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    sink = torch.randn(4, generator=gen, dtype=torch.float64) if sinks else None
    cu = torch.tensor([0, 5, 12]) if docs else None
    got = _reference_attention(q, k, v, window, sink, cu)
    want = _rowwise(q, k, v, window, sink, (0, 5) if docs else (0,))
    assert (got - want).abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------------------
# SP = 4 and SP = 2 x DP = 2 against one process, float64

CASES = {  # name: (GPTConfig keywords, layout, packed documents)
    "window5_alternating_sinks_gqa": (dict(window=5, layer_types=(SLIDING, FULL), sinks=True, num_kv_heads=2,
                                           position_embedding="rope", tie_embeddings=False), "balanced", False),
    "window13_sinks_learned": (dict(window=13, sinks=True), "contiguous", False),
    "window1_sinks_mqa": (dict(window=1, sinks=True, num_kv_heads=1, position_embedding="rope"), "balanced", False),
    "window9_no_sinks": (dict(window=9), "contiguous", False),
    "sinks_only": (dict(sinks=True, position_embedding="rope"), "balanced", False),
    "window6_sinks_packed": (dict(window=6, sinks=True, num_kv_heads=2, position_embedding="rope"), "balanced", True),
}
CU_SEQLENS = [0, 7, 19, 20, 32]  # documents crossing shard boundaries at SP = 2 and 4, one of a single token


def _batch():
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _case(sp, name, ulysses=1):
    from lss_plugin.documents import positions_in_documents

    kwargs, layout, packed = CASES[name]
    topo = lss_plugin.init_topology(sp, ulysses_size=ulysses)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, max_seq_length=SEQ, hidden_size=32, num_layers=2, num_heads=4, **kwargs)
    reference = GPT(config).double()
    with torch.no_grad():  # sinks of either sign and size, so they move the softmax
        for n, p in reference.named_parameters():
            if n.endswith("attn.sinks"):
                p.normal_(0.0, 1.5)
    model = GPT(config, LSSAttentionOptions(layout=layout)).double()
    model.load_state_dict(reference.state_dict())
    inputs, labels = _batch()
    cu = torch.tensor(CU_SEQLENS) if packed else None
    ref_positions = positions_in_documents(torch.arange(SEQ), cu) if packed else None
    ref_loss = F.cross_entropy(reference(inputs, ref_positions, cu).reshape(-1, VOCAB), labels.reshape(-1))
    ref_loss.backward()

    rows = slice(topo.dp_rank * BATCH // topo.dp_size, (topo.dp_rank + 1) * BATCH // topo.dp_size)
    idx = local_token_indices(SEQ, topo.sp_rank, sp, layout, ulysses_size=ulysses)
    positions = lss_plugin.local_positions(SEQ, layout=layout, cu_seqlens=cu)
    out = lss_plugin.sharded_cross_entropy(model(inputs[rows][:, idx], positions, cu), labels[rows][:, idx],
                                           group=topo.sp_group)
    out.loss.backward()
    lss_plugin.average_gradients(model.parameters(), topo, mode="two_stage")
    loss = lss_plugin.reduce_loss(out.local_mean, topo).item()
    ref, got = _grads(reference), _grads(model)
    lss_plugin.destroy_topology()
    return {
        "loss_err": abs(loss - ref_loss.item()) / abs(ref_loss.item()),
        "grad_err": {n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref},
        "sink_grad_norm": sum(ref[n].norm().item() for n in ref if n.endswith("sinks")),
    }


HYBRID = ("window5_alternating_sinks_gqa", "window6_sinks_packed")  # also at SP = 4 as Ulysses 2 x LSS 2


def _sweep(sps, names):
    plain = [((sp, 1, name), _case(sp, name)) for sp in sps for name in names]
    return plain + [((4, 2, name), _case(4, name, ulysses=2)) for name in HYBRID]


def test_windows_and_sinks_at_sp4_and_sp2_match_one_process_float64():
    """SP = 4, SP = 2 x DP = 2, and SP = 4 as the hybrid Ulysses 2 x LSS 2 (it slices the sinks per head)."""
    for results in run_ranks(_sweep, 4, (4, 2), list(CASES), timeout_s=900):
        assert len(results) == 2 * len(CASES) + len(HYBRID)
        for (sp, ulysses, name), r in results:
            case = (sp, ulysses, name)
            print(case, f"loss {r['loss_err']:.2e}, worst gradient {max(r['grad_err'].values()):.2e}, "
                  f"sinks' gradient norm {r['sink_grad_norm']:.2e}")
            assert r["loss_err"] < TOL, (case, r["loss_err"])
            worst = max(r["grad_err"].items(), key=lambda item: item[1])
            assert worst[1] < TOL, (case, worst)
            if CASES[name][0].get("sinks"):
                assert any(n.endswith("attn.sinks") for n in r["grad_err"]) and r["sink_grad_norm"] > 1e-6, case  # not vacuously zero
