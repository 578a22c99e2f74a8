"""Packed documents under attn_implementation="lss" (issue 15), against the one-process packed run.

Batches come from transformers' own ``DataCollatorWithFlattening``: the documents of a batch in one
row, ``position_ids`` restarting at 0 for each, ``labels`` -100 at each document's first token, and,
with ``return_flash_attn_kwargs=True``, ``cu_seq_lens_q/k`` and ``max_length_q/k``.

Reference: the same transformers model (same config, same seeded weights) with "eager" attention in
one process on the whole packed row with its restarting ``position_ids`` and no attention mask, so
transformers itself builds the block-diagonal causal mask (``find_packed_sequence_indices``); the loss
is the token mean of ``shift_labels_for_causal_lm(labels)``. LSS runs in a real DeepSpeed ZeRO-2 engine
at SP=2 (contiguous and balanced layouts), the batch split by ``shard_causal_lm_batch``. Tolerances
(float32), as tests/test_hf.py: losses within 1e-5 relative; every parameter's gradient, and every
parameter after the SGD steps, within 1e-5 relative (norm of the difference over the reference norm).
The reference's loss *without* the document mask differs by at least 10x the tolerance, so a run
that attended across documents could not pass.
"""
from __future__ import annotations

import pytest
import torch

RTOL = 1e-5
# The reference without the document mask must miss the packed loss by this many tolerances (measured:
# at least 24x at the random initialisation, where every loss is near ln 256).
SENSITIVITY = 10
STEPS = 2
LR = 0.5
# Document lengths of the two packed batches (one per step). Contiguous SP=2 splits at 16, balanced at
# 8/16/24: documents spanning ranks, one-token documents, a batch of 29 tokens the layout must pad.
DOCS = {"even": ([3, 1, 17, 6, 5], [9, 9, 1, 13]), "odd": ([7, 2, 11, 9], [1, 20, 8])}


def _collate(step: int, docs: str, flash: bool):
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(500 + step)
    examples = [{"input_ids": torch.randint(0, 256, (n,), generator=gen).tolist()} for n in DOCS[docs][step]]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash)(examples)


# ---------------------------------------------------------------------------------------------
# In-process checks (no process group)

def test_boundaries_from_collator_and_refusals():
    from lss_plugin.hf import pad_for_layout, packed_boundaries

    batch = _collate(0, "even", flash=True)
    length = batch["input_ids"].shape[1]
    expected = [0, 3, 4, 21, 27, 32]
    assert packed_boundaries(length, batch["position_ids"]).tolist() == expected
    flash = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    assert packed_boundaries(length, batch["position_ids"], **flash).tolist() == expected
    assert packed_boundaries(length, None, **flash).tolist() == expected
    assert packed_boundaries(length, torch.arange(length)[None]) is None  # one document: the ordinary path

    padded = pad_for_layout(_collate(0, "odd", flash=True), 8)  # 29 tokens -> 32: the padding is a document
    assert padded["input_ids"].shape == (1, 32) and padded["attention_mask"][0, 29:].tolist() == [0, 0, 0]
    assert packed_boundaries(32, padded["position_ids"], cu_seq_lens_q=padded["cu_seq_lens_q"],
                             cu_seq_lens_k=padded["cu_seq_lens_k"]).tolist() == [0, 7, 9, 20, 29, 32]
    assert padded["labels"][0, 29:].tolist() == [-100] * 3

    cu = batch["cu_seq_lens_q"]
    other = torch.tensor([0, 4, 21, 27, 32], dtype=torch.int32)
    refusals = {
        "jump": (lambda: packed_boundaries(6, torch.tensor([[0, 1, 2, 5, 6, 7]])), r"position_ids\[3\] = 5 after 2"),
        "offset": (lambda: packed_boundaries(3, torch.tensor([[4, 5, 6]])), "must start at 0, got 4"),
        "q_vs_k": (lambda: packed_boundaries(length, cu_seq_lens_q=cu, cu_seq_lens_k=other),
                   "cu_seq_lens_q .* differs from cu_seq_lens_k"),
        "k_missing": (lambda: packed_boundaries(length, cu_seq_lens_q=cu), "cu_seq_lens_k is missing"),
        "max_length": (lambda: packed_boundaries(length, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5),
                       "max_length_q = 5 but the longest document .* is 17"),
        "disagree": (lambda: packed_boundaries(length, batch["position_ids"], cu_seq_lens_q=other,
                                               cu_seq_lens_k=other), "disagree"),
        "length": (lambda: packed_boundaries(40, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu), "end at the global"),
    }
    for name, (call, pattern) in refusals.items():
        with pytest.raises(ValueError, match=pattern):
            call()


def test_pack_windows_starts_documents_at_rows_and_separators():
    from lss_plugin.hf import pack_windows, packed_boundaries

    windows = torch.tensor([list(b"ab<page>cd<p"), list(b"xy<page><pag")])  # [2, L + 1 = 12]
    packed = pack_windows(windows)
    assert packed["input_ids"].tolist() == [list(b"ab<page>cd<") + list(b"xy<page><pa")]
    # rows start documents, so do whole separators; a separator cut by the window's end does not
    assert packed_boundaries(22, packed["position_ids"]).tolist() == [0, 2, 11, 13, 22]
    targets = packed["shift_labels"][0]
    assert targets[10] == -100 and targets[21] == -100  # a window's last token predicts nothing
    assert targets[:10].tolist() == list(b"b<page>cd<")  # inside a window: the next byte


# ---------------------------------------------------------------------------------------------
# Multi-rank: one spawn of 2 ranks

def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference_loss(model, batch, packed: bool = True):
    """Token-mean loss of the one-process model on the whole packed row (transformers' packed mask)."""
    import lss_plugin.hf as hf

    labels = hf.shift_labels_for_causal_lm(batch["labels"])  # [1, L]: -100 at every document's last token
    positions = batch["position_ids"] if packed else None  # None: one causal sequence (no document mask)
    logits = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits  # [1, L, V]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _ds_case(model_type, layout, heads, kv_heads, docs, keys, sp=2, ulysses=1):
    """STEPS steps of a ZeRO-2 engine (SP=``sp``, DP=1; ``ulysses`` > 1: the hybrid LSS x Ulysses,
    tests/test_deepspeed_hybrid.py) next to the one-process packed model with the same SGD.

    ``keys``: the collator keys handed to shard_causal_lm_batch: "positions" (position_ids, labels),
    "flash" (the FlashAttentionKwargs only, no position_ids or labels: positions and the ignored
    cross-document targets then come from the boundaries alone) or "both" (everything, cross-checked). Returns per step (ref loss, unmasked ref loss, LSS loss, max grad rel. error)
    and the max parameter rel. error after the last step."""
    from deepspeed.utils import safe_get_full_grad

    import lss_plugin.hf as hf
    from lss_plugin.grads import reduce_loss
    from lss_plugin.topology import destroy_topology

    config = hf.small_causal_lm_config(model_type, hidden_size=4 * heads, num_heads=heads, num_kv_heads=kv_heads,
                                       num_layers=2, max_positions=32)
    ref = hf.build_causal_lm(config, attn_implementation="eager", seed=3)
    model = hf.build_causal_lm(config, attn_implementation="lss", seed=3)
    ds_config = {
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 0.0,
        "lss_sequence_parallel": {"size": sp, "layout": layout, "ulysses_size": ulysses},
    }
    engine, *_ = hf.deepspeed_initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), config=ds_config)
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    steps = []
    for step in range(STEPS):
        batch = _collate(step, docs, flash=keys in ("flash", "both"))
        ref.zero_grad(set_to_none=True)
        with torch.no_grad():
            unmasked = float(_reference_loss(ref, batch, packed=False))
        ref_loss = _reference_loss(ref, batch)
        ref_loss.backward()
        ref_grads = [p.grad.clone() for p in ref.parameters()]
        ref_optimizer.step()

        given = {k: v for k, v in batch.items() if keys != "flash" or k == "input_ids" or k.startswith(("cu_", "max_"))}
        given = hf.pad_for_layout(given)  # the registered layout: a multiple of sp or 2 * sp
        sharded = hf.shard_causal_lm_batch(**given)
        assert sharded.cu_seqlens is not None
        assert engine.lss_topology.ulysses_size == ulysses  # the topology the block asked for
        loss = hf.causal_lm_loss(engine(**sharded.model_inputs()).logits, sharded.shift_labels)
        engine.backward(loss.loss)
        err = max(_rel(safe_get_full_grad(p), r) for p, r in zip(engine.module.parameters(), ref_grads))
        engine.step()
        steps.append((float(ref_loss.detach()), unmasked, float(reduce_loss(loss.local_mean, num_tokens=loss.num_tokens)), err))
    params_err = max(_rel(p.detach(), r.detach()) for p, r in zip(engine.module.parameters(), ref.parameters()))
    engine.lss_mpu.destroy()
    engine.destroy()
    destroy_topology()
    return steps, params_err


def _refusals():
    """Packed inputs LSS cannot honour fail on every rank, by name, before the K/V gather."""
    import lss_plugin
    import lss_plugin.hf as hf
    from lss_plugin.topology import destroy_topology

    lss_plugin.init_topology(2)
    hf.register_lss_attention(layout="balanced")
    model = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1))
    batch = _collate(0, "even", flash=True)
    inputs = hf.shard_causal_lm_batch(**batch).model_inputs()
    found = {}

    def attempt(name, **changes):
        try:
            model(**{**inputs, **changes})
            found[name] = None
        except ValueError as err:
            found[name] = str(err)

    other = torch.tensor([0, 4, 21, 27, 32], dtype=torch.int32)
    attempt("q_vs_k", cu_seq_lens_k=other, max_length_k=17)
    # Restarting positions without the global boundaries: a rank cannot know where documents start elsewhere.
    attempt("no_boundaries", cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None)
    # The collator's row given unsharded: its boundaries end at 32, the model sees 2 x 32 positions.
    attempt("unsharded", input_ids=batch["input_ids"], position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]))
    hf.register_lss_attention()
    destroy_topology()
    return found


# (model_type, layout, heads, kv_heads, docs, keys handed to shard_causal_lm_batch)
DS_CASES = [
    ("llama", "contiguous", 4, 2, "even", "positions"),  # GQA, RoPE; position_ids + labels from the collator
    ("llama", "balanced", 4, 1, "odd", "flash"),  # MQA; boundaries only, 29 tokens padded to 32
    ("gpt2", "balanced", 4, None, "even", "both"),  # learned absolute positions restart per document
]


def _two_rank_cases():
    out = {"refusals": _refusals(), "ds": {}}
    for case in DS_CASES:
        out["ds"][case] = _ds_case(*case)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    from tests.distributed import run_ranks

    return run_ranks(_two_rank_cases, 2, timeout_s=600, pg_timeout_s=120)


def _assert_packed_matches(case, steps, params_err):
    """One ``_ds_case`` run against its one-process packed reference, within RTOL."""
    assert params_err <= RTOL, (case, params_err)
    for step, (ref_loss, unmasked, loss, grad_err) in enumerate(steps):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (case, step, loss, ref_loss)
        assert grad_err <= RTOL, (case, step, grad_err)
        # The document mask matters on this data: attending across documents would be caught.
        assert abs(unmasked - ref_loss) > SENSITIVITY * RTOL * abs(ref_loss), (case, step, unmasked, ref_loss)


def test_packed_deepspeed_sp2_matches_one_process(two_ranks):
    for rank_out in two_ranks:
        for case, (steps, params_err) in rank_out["ds"].items():
            _assert_packed_matches(case, steps, params_err)
    runs = [run for o in two_ranks for run in o["ds"].values()]
    worst_loss = max(abs(l - r) / abs(r) for st, _ in runs for r, _, l, _ in st)
    worst_grad = max(e for st, _ in runs for *_, e in st)
    worst_param = max(err for _, err in runs)
    least_gap = min(abs(u - r) / abs(r) for st, _ in runs for r, u, _, _ in st)
    print(f"\nHF packed + DeepSpeed ZeRO-2 SP=2, {len(DS_CASES)} cases x {STEPS} steps: worst rel. errors: loss "
          f"{worst_loss:.2e}, gradients {worst_grad:.2e}, parameters {worst_param:.2e} (tolerance {RTOL}); "
          f"unmasked reference differs by >= {least_gap:.2e}")


def test_packed_refusals_name_themselves(two_ranks):
    for found in (r["refusals"] for r in two_ranks):
        assert found["q_vs_k"] is not None and "differs from cu_seq_lens_k" in found["q_vs_k"], found
        assert found["no_boundaries"] is not None and "no cu_seq_lens_q/cu_seq_lens_k given" in found["no_boundaries"]
        assert found["unsharded"] is not None and "end at the global sequence length 64" in found["unsharded"]
