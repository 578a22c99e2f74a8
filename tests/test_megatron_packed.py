"""Packed documents through megatron-core, end to end: a real GPTModel on CPU/gloo.

The training script with ``--reset-attention-mask --reset-position-ids --eod-mask-loss`` (documents
end at EOD bytes, some written as ``</page>`` lines the loader marks, some raw; documents of every
length, some crossing the rank boundary) on LSS SP=2, both layouts, must give the one-rank run's
per-iteration losses, clipping norms and reduced gradients within 1e-5 relative (float32). Two
independent one-rank references: megatron-core's local attention with its dense document mask
(``_get_ltor_masks_and_position_ids``) where RoPE positions do not restart or positions are learned,
and megatron-core's own THD RoPE (``_apply_rotary_pos_emb_thd``, one CP rank, LSS core attention on
one rank) where they do. The K/V collectives of a packed run are those of the unpacked run. The
core attention's packed inputs (THD and SBHD) are checked in float64 against per-document attention,
and what LSS cannot honour is refused by name on both ranks. One 2-rank and one 1-rank spawn.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_ranks
from tests.test_megatron import KV_COLLECTIVES, SPARSE_COLLECTIVES, LOSS_RTOL, GRAD_RTOL, _run_cases, case, uneven_loss_mask

pytest.importorskip("megatron.core")

ITERS = 3
SEQ = 64
ONE_ROW = ["--micro-batch-size", "1", "--global-batch-size", "2"]  # THD: one packed row per micro-batch
DOCS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
LSS = ["--lss-sequence-parallel"]
CONTIGUOUS = ["--lss-layout", "contiguous"]  # the default is balanced
LSS1 = LSS + ["--lss-sequence-parallel-size", "1"]


def packed_splits():
    """Random printable bytes cut into documents of 1 to 31 bytes: EOD bytes and ``</page>`` lines."""
    from lss_plugin.data import EOD_BYTE, split_bytes

    rng = np.random.default_rng(1)
    pieces = []
    while sum(map(len, pieces)) < 48_000:
        size = 0 if rng.random() < 0.15 else int(rng.integers(1, 24))
        body = rng.integers(32, 127, size=size, dtype=np.uint8).tobytes()
        pieces.append(body + (b"</page>\n" if rng.random() < 0.3 else bytes([EOD_BYTE])))
    return split_bytes(np.frombuffer(b"".join(pieces), dtype=np.uint8), source="<packed>", sha256="packed")


def pcase(pos, *extra, masked=False):
    return case(pos, masked, *ONE_ROW, *extra, iters=ITERS)


CASES_2 = {
    # RoPE restarting in every document: THD, reference = megatron-core's THD RoPE on one rank.
    "sp2_contiguous_rope_docs": pcase("rope", *LSS, *CONTIGUOUS, *DOCS),
    "sp2_balanced_rope_docs_regather": pcase("rope", *LSS, *DOCS, "--lss-layout", "balanced",
                                             "--lss-kv-backward", "regather", masked=True),
    # Learned positions restarting, and RoPE over the whole sequence (attention mask only):
    # reference = megatron-core's dense document mask with its local attention.
    "sp2_balanced_learned_docs": pcase("learned_absolute", *LSS, *DOCS, "--lss-layout", "balanced"),
    "sp2_contiguous_rope_mask_only": pcase("rope", *LSS, *CONTIGUOUS, "--reset-attention-mask", "--eod-mask-loss",
                                           masked=True),
    # The same windows, loss mask and positions without the document mask: the K/V collectives of
    # the packed runs, other losses.
    "sp2_contiguous_rope_unpacked": pcase("rope", *LSS, *CONTIGUOUS, "--eod-mask-loss", masked=True),
}
CASES_1 = {
    "ref_thd_rope_docs": pcase("rope", *LSS1, *DOCS),
    "ref_thd_rope_docs_masked": pcase("rope", *LSS1, *DOCS, masked=True),
    "ref_dense_learned_docs": pcase("learned_absolute", *DOCS),
    "ref_dense_rope_mask_only": pcase("rope", "--reset-attention-mask", "--eod-mask-loss", masked=True),
    # LSS's THD on one rank against megatron-core's dense mask: the two references agree.
    "thd_learned_docs_on_one_rank": pcase("learned_absolute", *LSS1, *DOCS),
}
REFERENCE = {
    "sp2_contiguous_rope_docs": "ref_thd_rope_docs",
    "sp2_balanced_rope_docs_regather": "ref_thd_rope_docs_masked",
    "sp2_balanced_learned_docs": "ref_dense_learned_docs",
    "sp2_contiguous_rope_mask_only": "ref_dense_rope_mask_only",
    "thd_learned_docs_on_one_rank": "ref_dense_learned_docs",
}


# ---------------------------------------------------------------------------------------------
# Core attention and rotary module on two ranks: packed inputs, refusals.

def _check_packed_attention() -> dict:
    """LSSDotProductAttention with THD and SBHD packed inputs (float64) against per-document attention,
    and every refusal by name. Runs on each rank of an SP=2 group; returns the worst error."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.megatron.attention import configured_lss_attention
    from lss_plugin.megatron.parallel import initialize_lss_model_parallel, lss_transformer_config_kwargs
    from lss_plugin.megatron.rope import adopt_rotary
    from lss_plugin.sharding import local_token_indices

    initialize_lss_model_parallel(2, timeout_s=60)
    rank = dist.get_rank()
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                               attention_dropout=0.0, **lss_transformer_config_kwargs(2))
    L, heads, d = 16, 2, 8
    cu = torch.tensor([0, 1, 5, 13, 16], dtype=torch.int32)  # a 1-token document, one across ranks
    gen = torch.Generator().manual_seed(0)
    q_all = torch.randn(L, heads, d, generator=gen, dtype=torch.float64)
    kv_all = torch.randn(2, L, 1, d, generator=gen, dtype=torch.float64)  # MQA: one KV head
    # Per-document causal attention over the whole sequence, in one process.
    doc = torch.searchsorted(cu.long(), torch.arange(L), right=True)
    pos = torch.arange(L)
    visible = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])  # [L, L]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q_all.transpose(0, 1), kv_all[0].transpose(0, 1).expand(heads, L, d),
        kv_all[1].transpose(0, 1).expand(heads, L, d), attn_mask=visible).transpose(0, 1)  # [L, heads, d]
    worst = 0.0
    for layout in ("contiguous", "balanced"):
        attn = configured_lss_attention(layout=layout)(config, 1, AttnMaskType.causal, "self")
        index = local_token_indices(L, rank, 2, layout)
        q, k, v = q_all[index], kv_all[0, index], kv_all[1, index]  # [8, heads or 1, d]
        expect = ref[index].reshape(len(index), heads * d)
        thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
        out = attn(q, k, v, None, packed_seq_params=thd)  # [t_local, heads * d]
        sbhd = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        out_sbhd = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=sbhd)  # [s, 1, h * d]
        worst = max(worst, float((out - expect).abs().max()), float((out_sbhd[:, 0] - expect).abs().max()))

    attn = configured_lss_attention()(config, 1, AttnMaskType.causal, "self")
    q, k = q_all[:8], kv_all[0, :8]
    refused = {}

    def refuse(name, error, match, params, *tensors, mask=None):
        tensors = tensors or (q, k, k)
        with pytest.raises(error, match=match):
            attn(*tensors, mask, packed_seq_params=params)
        refused[name] = True

    other = torch.tensor([0, 6, 16], dtype=torch.int32)
    refuse("kv boundaries", NotImplementedError, "cu_seqlens_kv differs from cu_seqlens_q",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=other))
    refuse("padded", NotImplementedError, "cu_seqlens_q_padded differs from cu_seqlens_q .*Megatron-CP",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=other))
    refuse("hybrid cp", NotImplementedError, "local_cp_size=2",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, local_cp_size=2))
    refuse("max_seqlen short", ValueError, r"max_seqlen_q/kv=7 is shorter than the longest document \(8 tokens",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7))
    refuse("max_seqlen q != kv", ValueError, "max_seqlen_q=8 != max_seqlen_kv=16",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=16))
    refuse("boundaries beyond L", ValueError, "end at the global sequence length 16",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 5, 12], dtype=torch.int32)))
    refuse("format", NotImplementedError, "qkv_format=None", PackedSeqParams(cu_seqlens_q=cu))
    two_rows = (q[:, None].expand(8, 2, heads, d), k[:, None].expand(8, 2, 1, d), k[:, None].expand(8, 2, 1, d))
    refuse("sbhd batch 2", NotImplementedError, "qkv_format='sbhd' and batch 2",
           PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu), *two_rows)
    refuse("mask and documents", NotImplementedError, "attention_mask together with packed_seq_params",
           PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu), mask=torch.zeros(1, 1, 8, L, dtype=torch.bool))
    # A rotary module feeding megatron-core's own SelfAttention cannot place packed rows under LSS.
    rotary = adopt_rotary(RotaryEmbedding(kv_channels=d, rotary_percent=1.0, use_cpu_initialization=True),
                          "contiguous", rows_in_attention=False)
    with pytest.raises(NotImplementedError, match="need LSSSelfAttention in every layer"):
        rotary(8, packed_seq=True)
    refused["rope without LSSSelfAttention"] = True
    parallel_state.destroy_model_parallel()
    return {"worst": worst, "refused": sorted(refused)}


def _run_two_ranks() -> dict:
    out = _run_cases(CASES_2, splits_fn=packed_splits)
    out["attention"] = _check_packed_attention()
    return out


@pytest.fixture(scope="module")
def runs2():
    return run_ranks(_run_two_ranks, 2, timeout_s=300, pg_timeout_s=120)


@pytest.fixture(scope="module")
def runs1(runs2):
    return run_ranks(_run_cases, 1, CASES_1, splits_fn=packed_splits, timeout_s=300, pg_timeout_s=120)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_packed_losses_and_gradients_match_one_rank(name, runs2, runs1):
    per_rank = runs2 if name in CASES_2 else [runs1]
    ref = runs1[REFERENCE[name]]
    worst_loss = worst_grad = 0.0
    for rank, results in enumerate(per_rank):
        got = results[name]
        assert got["iterations"] == list(range(1, ITERS + 1)) == ref["iterations"]
        assert got["tokens"] == ref["tokens"], (rank, got["tokens"], ref["tokens"])
        for value, expect in zip(got["losses"] + got["grad_norms"], ref["losses"] + ref["grad_norms"]):
            assert abs(value - expect) <= LOSS_RTOL * abs(expect), (rank, value, expect)
            worst_loss = max(worst_loss, abs(value - expect) / abs(expect))
        assert set(got["probes"]) == set(ref["probes"])
        for param, grad in got["probes"].items():
            error = float(np.abs(grad - ref["probes"][param]).max() / np.abs(ref["probes"][param]).max())
            assert error <= GRAD_RTOL, (rank, param, error)
            worst_grad = max(worst_grad, error)
    print(f"\n{name}: worst loss/norm deviation {worst_loss:.2e} (relative), worst gradient {worst_grad:.2e}")


@pytest.mark.slow
def test_documents_change_the_losses_so_the_comparison_can_fail(runs2):
    """Same windows (EOD bytes marked), loss tokens and positions: only the document mask differs, and
    the first iteration's loss and gradients with it."""
    for results in runs2:
        packed, unpacked = results["sp2_contiguous_rope_mask_only"], results["sp2_contiguous_rope_unpacked"]
        assert packed["tokens"] == unpacked["tokens"]
        # At initialisation attention is nearly uniform, so the loss moves little (3e-4 measured), but
        # far more than the tolerances the comparisons with one rank use.
        first, first_unpacked = packed["losses"][0], unpacked["losses"][0]
        assert abs(first - first_unpacked) > 10 * LOSS_RTOL * abs(first_unpacked), (first, first_unpacked)
        for param, grad in packed["probes"].items():
            other = unpacked["probes"][param]
            assert np.abs(grad - other).max() > 10 * GRAD_RTOL * np.abs(other).max(), param


@pytest.mark.slow
def test_packed_run_sends_only_what_the_documents_read(runs2):
    """The default kv_exchange ("auto"): the unpacked causal run gathers (one gather forward, one
    reduce-scatter backward per layer and micro-batch); the packed runs (documents of 1-31 tokens,
    from THD boundaries or from the attention mask) decide per call from the plan: one sparse
    exchange forward (and one back unless nothing crosses ranks) where it sends at most 3/4 of the
    gather, else the gather; the same for both sources of boundaries, and fewer bytes in all."""
    for results in runs2:
        unpacked = results["sp2_contiguous_rope_unpacked"]["kv_collectives"]
        docs, mask_only = (results[n]["kv_collectives"] for n in ("sp2_contiguous_rope_docs",
                                                                 "sp2_contiguous_rope_mask_only"))
        assert docs == mask_only  # the same documents, read from either place
        per_run = ITERS * 2 * 2  # 2 layers x 2 micro-batches per iteration
        assert {n: unpacked[n][0] for n in KV_COLLECTIVES + SPARSE_COLLECTIVES} == {
            **{n: per_run for n in KV_COLLECTIVES}, **{n: 0 for n in SPARSE_COLLECTIVES}}, unpacked
        (gathers, _), (scatters, _), (exchanges, _), (returns, _) = (
            docs[n] for n in KV_COLLECTIVES + SPARSE_COLLECTIVES)
        assert gathers == scatters and gathers + exchanges == per_run and exchanges > per_run // 2, docs
        assert returns <= exchanges, docs  # no dK/dV collective where nothing crossed ranks
        sent = sum(b for _, b in docs.values())
        gathered = sum(b for _, b in unpacked.values())
        assert 0 < sent < 0.75 * gathered, (sent, gathered)


@pytest.mark.slow
def test_core_attention_reads_global_boundaries_and_refuses_by_name(runs2):
    for results in runs2:
        attention = results["attention"]
        assert attention["worst"] <= 1e-12, attention["worst"]  # float64, per-document reference
        assert attention["refused"] == sorted([
            "kv boundaries", "padded", "hybrid cp", "max_seqlen short", "max_seqlen q != kv",
            "boundaries beyond L", "format", "sbhd batch 2", "mask and documents", "rope without LSSSelfAttention"])
    worst = max(results["attention"]["worst"] for results in runs2)
    print(f"\npacked core attention vs per-document attention (float64): worst {worst:.1e}")


# ---------------------------------------------------------------------------------------------
# No processes: the data and the flags.

def test_windows_hold_documents_across_the_rank_boundary():
    """The test data really packs: several documents per window, 1-token ones, one across s_local."""
    from lss_plugin.data import EOD_BYTE, sample_batch, with_document_ends
    from lss_plugin.documents import cu_seqlens_from_eod

    splits = with_document_ends(packed_splits())
    lengths, crossing = [], 0
    for step in range(1, ITERS + 1):
        for row in sample_batch(splits.train, 2, SEQ, step=step, seed=7)[:, :-1]:
            cu = cu_seqlens_from_eod(row, EOD_BYTE).tolist()
            lengths += [b - a for a, b in zip(cu[:-1], cu[1:])]
            crossing += any(a < SEQ // 2 < b for a, b in zip(cu[:-1], cu[1:]))
    assert len(lengths) >= 6 * ITERS and min(lengths) == 1 and crossing >= ITERS


def test_page_ends_become_eod_bytes():
    from lss_plugin.data import EOD_BYTE, mark_document_ends

    text = np.frombuffer(b"<page>a</page>\n  <page>b</page>\n</page", dtype=np.uint8)
    marked = mark_document_ends(text, b"</page>\n", EOD_BYTE)
    assert np.flatnonzero(marked != text).tolist() == [14, 31]
    assert (marked[[14, 31]] == EOD_BYTE).all() and (text[[14, 31]] == ord("\n")).all()


def test_boundaries_and_megatron_positions_agree():
    """cu_seqlens from EOD tokens restart exactly where megatron-core's reset position ids restart."""
    from lss_plugin.documents import cu_seqlens_from_position_ids
    from lss_plugin.megatron.packed import ltor_masks, packed_seq_params_from_eod

    tokens = torch.tensor([[5, 3, 3, 7, 8, 9, 3, 4]])
    _, loss_mask, position_ids = ltor_masks(tokens, 3, True, True, True, False)
    params = packed_seq_params_from_eod(tokens, 3, reset_position_ids=True)
    assert params.cu_seqlens_q.tolist() == cu_seqlens_from_position_ids(position_ids).tolist() == [0, 2, 3, 7, 8]
    assert (params.max_seqlen_q, params.qkv_format) == (4, "thd")
    assert loss_mask.tolist() == [[1, 0, 0, 1, 1, 1, 0, 1]]
    # Without position resets the table spans the sequence: megatron-core's THD RoPE keeps positions.
    assert packed_seq_params_from_eod(tokens, 3, reset_position_ids=False).max_seqlen_q == 8


def _parse(argv, world_size):
    from lss_plugin.megatron.pretrain import parse_args
    from tests.test_megatron import BASE

    return parse_args(BASE + list(argv), world_size=world_size)


@pytest.mark.parametrize("argv,world,message", [
    (LSS + ["--reset-attention-mask"], 2, r"packs a micro-batch as one THD sequence: use --micro-batch-size 1 "
                                         r"\(got 2"),
    (["--reset-attention-mask", "--core-attention", "sdpa"], 1, r"needs --core-attention local"),
    (["--reset-position-ids", "--reset-attention-mask", "--position-embedding-type", "rope"], 1,
     r"--reset-position-ids with --position-embedding-type rope needs --lss-sequence-parallel"),
    (LSS + ONE_ROW + ["--reset-position-ids", "--position-embedding-type", "rope"], 2,
     r"needs --lss-sequence-parallel and --reset-attention-mask"),
])
def test_document_flags_that_cannot_be_honoured_are_refused(argv, world, message):
    with pytest.raises(ValueError, match=message):
        _parse(argv, world)


def test_document_flags_are_accepted_where_they_can_be_honoured():
    args = _parse(LSS + ONE_ROW + DOCS + ["--position-embedding-type", "rope"], 2)
    assert (args.reset_attention_mask, args.reset_position_ids, args.eod_mask_loss) == (True, True, True)
    _parse(LSS + ["--reset-position-ids", "--eod-mask-loss"], 2)  # learned positions: any micro-batch
    _parse(DOCS, 1)  # one device: megatron-core's dense document mask


def test_megatron_lm_checkout_refuses_its_dense_document_mask():
    import argparse

    from lss_plugin.megatron.megatron_lm import refuse_megatron_lm_flags

    with pytest.raises(ValueError, match="--reset-attention-mask"):
        refuse_megatron_lm_flags(argparse.Namespace(reset_attention_mask=True))
    refuse_megatron_lm_flags(argparse.Namespace(reset_position_ids=True))
