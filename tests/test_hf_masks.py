"""Per-layer masks of today's open models under attn_implementation="lss" (issue 28), against one process.

Families, each from a small config (2 layers, hidden 64, byte vocabulary) whose windows and chunks are
SMALLER than the sequence (L = 64), so the masks change the result:
Mistral (sliding window on every layer), Gemma 2 (sliding / full layers, attn_logit_softcapping ->
``softcap``, query_pre_attn_scalar -> ``scaling``), Gemma 3 (layer_types), gpt-oss (sliding / full
layers, learned sinks ``s_aux``), Qwen3 (use_sliding_window from max_window_layers on), Llama 4 text
(chunked attention, chunk 24 dividing neither L nor any rank's share; a NoPE full layer with
temperature tuning) and Cohere 2 (sliding / full layers).

Reference: the same transformers model (same config, same seeded weights) with "eager" attention in
one process on the whole global batch: transformers' own masks, softcapping and sinks. LSS runs at
SP = 2 x DP = 2 (contiguous), SP = 4 (balanced) and SP = 4 with Ulysses 2 (contiguous), plain torch:
``causal_lm_loss`` + ``average_gradients``, 3 steps of SGD with momentum. Packed documents
(DataCollatorWithFlattening rows; the reference runs each document on its own, so windows and chunks
restart with each document) for gpt-oss and Llama 4 at SP = 4. Tolerances (float32): every step's loss within
1e-5 relative, every parameter's gradient (the sinks' included) within 1e-5 relative (norm of the
difference over the reference norm), every parameter after the last step within 1e-5 relative.
The masks matter on this data: the same model with every layer full-causal misses the reference loss
by more than SENSITIVITY x the tolerance (checked in process), so a run that ignored a window, a chunk,
the softcap or the sinks could not pass.

One spawn of 4 ranks runs everything (CI budget: 2 cores).
"""
from __future__ import annotations

import pytest
import torch

RTOL = 1e-5
SENSITIVITY = 10
SEQ_LEN = 64  # divisible by 2 * 4: balanced layout on SP = 4
GLOBAL_BATCH = 4
STEPS = 3
LR = 0.2

# name -> (model_type, small_causal_lm_config overrides)
FAMILIES = {
    "mistral": ("mistral", dict(sliding_window=12, num_kv_heads=2)),
    "gemma2": ("gemma2", dict(sliding_window=10, layer_types=["sliding_attention", "full_attention"],
                              attn_logit_softcapping=0.3, query_pre_attn_scalar=4)),
    "gemma3": ("gemma3_text", dict(sliding_window=9, layer_types=["sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=8, num_kv_heads=2)),
    "gpt_oss": ("gpt_oss", dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                num_kv_heads=2)),
    "qwen3": ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, num_kv_heads=2)),
    "llama4": ("llama4_text", dict(attention_chunk_size=24, layer_types=["chunked_attention", "full_attention"],
                                   no_rope_layers=[1, 0], num_kv_heads=2)),
    "cohere2": ("cohere2", dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"], logit_scale=1.0)),
}
# (name, sp, ulysses, layout) on 4 ranks; sp = 2 leaves DP = 2
CONFIGS = [("sp2", 2, 1, "contiguous"), ("sp4", 4, 1, "balanced"), ("sp4_u2", 4, 2, "contiguous")]
PACKED_FAMILIES = ("gpt_oss", "llama4")
PACKED_DOCS = ([30, 5, 29], [7, 40, 17])  # per step; chunk 24 and window 16 cut inside documents


def _config(name: str, full: bool = False):
    """The family's small config; ``full``: windows and chunks wider than the sequence (every layer
    causal over all of it), no softcap (the sensitivity check)."""
    import lss_plugin.hf as hf

    model_type, overrides = FAMILIES[name]
    config = hf.small_causal_lm_config(model_type, max_positions=SEQ_LEN, **overrides)
    if full:
        for field in ("sliding_window", "attention_chunk_size"):
            if getattr(config, field, None) is not None:
                setattr(config, field, 2 * SEQ_LEN)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            config.attn_logit_softcapping = None
    return config


def _batch(step: int):
    gen = torch.Generator().manual_seed(2800 + step)
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN), generator=gen)


def _packed(step: int):
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(2900 + step)
    examples = [{"input_ids": torch.randint(0, 256, (n,), generator=gen).tolist()} for n in PACKED_DOCS[step % 2]]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference_loss(model, ids, labels=None, bounds=None):
    """Token-mean loss of the one-process model on the whole batch (transformers' masks). Packed
    documents (``bounds``, one row): each document run on its own, which is what packing means (gpt-oss
    builds its eager masks without position_ids, so transformers' own packed mask is not a reference)."""
    import lss_plugin.hf as hf

    targets = hf.shift_labels_for_causal_lm(ids if labels is None else labels)  # [B, L]
    if bounds is None:
        logits = model(input_ids=ids, use_cache=False).logits  # [B, L, V]
    else:
        logits = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits
                            for a, b in zip(bounds[:-1], bounds[1:])], dim=1)  # [1, L, V]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _reference_run(name: str, packed: bool = False):
    """Per step (loss, [grads]) of the one-process eager model under SGD."""
    import lss_plugin.hf as hf

    ref = hf.build_causal_lm(_config(name), attn_implementation="eager", seed=17)
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    steps = []
    for step in range(STEPS):
        ref.zero_grad(set_to_none=True)
        if packed:
            batch = _packed(step)
            loss = _reference_loss(ref, batch["input_ids"], batch["labels"], batch["cu_seq_lens_q"].tolist())
        else:
            loss = _reference_loss(ref, _batch(step))
        loss.backward()
        steps.append((float(loss.detach()), [p.grad.clone() for p in ref.parameters()]))
        optimizer.step()
    return steps, [p.detach().clone() for p in ref.parameters()]


def _lss_run(name: str, reference, packed: bool = False):
    """The same training under LSS on the registered topology: per step (ref loss, LSS loss, max grad
    rel. error, sinks grad rel. error or None), and the max parameter rel. error after the last step."""
    import lss_plugin.hf as hf
    from lss_plugin.grads import average_gradients, reduce_loss
    from lss_plugin.topology import get_topology

    topology = get_topology()
    model = hf.build_causal_lm(_config(name), attn_implementation="lss", seed=17)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    ref_steps, ref_params = reference
    steps = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        if packed:
            batch = hf.shard_causal_lm_batch(**hf.pad_for_layout(_packed(step)))
            assert batch.cu_seqlens is not None
        else:
            batch = hf.shard_causal_lm_batch(hf.data_parallel_rows(_batch(step), topology))
        loss = hf.causal_lm_loss(model(**batch.model_inputs()).logits, batch.shift_labels, group=topology.sp_group)
        loss.loss.backward()
        average_gradients(model.parameters(), topology, num_tokens=loss.num_tokens)
        ref_loss, ref_grads = ref_steps[step]
        errors = {n: _rel(p.grad, r) for n, p, r in zip(names, model.parameters(), ref_grads)}
        sinks = [e for n, e in errors.items() if n.endswith("self_attn.sinks")]
        steps.append((ref_loss, float(reduce_loss(loss.local_mean, num_tokens=loss.num_tokens)),
                      max(errors.values()), max(sinks) if sinks else None))
        optimizer.step()
    params_err = max(_rel(p.detach(), r) for p, r in zip(model.parameters(), ref_params))
    return steps, params_err


def _four_rank_cases():
    import lss_plugin
    import lss_plugin.hf as hf
    from lss_plugin.topology import destroy_topology

    references = {name: _reference_run(name) for name in FAMILIES}
    out = {}
    for config, sp, ulysses, layout in CONFIGS:
        lss_plugin.init_topology(sp, ulysses_size=ulysses)
        hf.register_lss_attention(layout=layout)
        for name in FAMILIES:
            out[(config, name)] = _lss_run(name, references[name])
        destroy_topology()
    lss_plugin.init_topology(4)
    hf.register_lss_attention(layout="balanced")
    for name in PACKED_FAMILIES:
        out[("sp4_packed", name)] = _lss_run(name, _reference_run(name, packed=True), packed=True)
    hf.register_lss_attention()
    destroy_topology()
    return out


@pytest.fixture(scope="module")
def four_ranks():
    from tests.distributed import run_ranks

    return run_ranks(_four_rank_cases, 4, timeout_s=900, pg_timeout_s=180)


# ---------------------------------------------------------------------------------------------
# In-process checks (no process group)

def test_layer_masks_read_from_each_config():
    """What each family's layers ask for, as the attention function derives it (L = 64)."""
    import lss_plugin.hf as hf
    from lss_plugin.hf.layer_masks import layer_mask

    seen = {}
    for name in FAMILIES:
        model = hf.build_causal_lm(_config(name), attn_implementation="eager")
        specs = []
        for layer in model.model.layers:
            attn = layer.self_attn
            passed = getattr(attn, "sliding_window", None)
            if name == "mistral":
                passed = attn.config.sliding_window  # Mistral passes config.sliding_window on every layer
            spec = layer_mask(attn, attn.config, passed, True, SEQ_LEN)
            specs.append((spec.window, spec.chunk))
        seen[name] = specs
    assert seen == {
        "mistral": [((11, 0), None), ((11, 0), None)],
        "gemma2": [((9, 0), None), (None, None)],
        "gemma3": [((8, 0), None), (None, None)],
        "gpt_oss": [((15, 0), None), (None, None)],
        "qwen3": [(None, None), ((7, 0), None)],  # sliding from max_window_layers = 1 on
        "llama4": [(None, 24), (None, None)],
        "cohere2": [((5, 0), None), (None, None)],
    }, seen


def test_masks_matter_on_this_data():
    """The same weights with every layer full-causal (and no softcap) miss the reference loss by more
    than SENSITIVITY x RTOL: a run ignoring any family's mask could not pass."""
    import lss_plugin.hf as hf

    gaps = {}
    for name in FAMILIES:
        with torch.no_grad():
            masked = float(_reference_loss(hf.build_causal_lm(_config(name), attn_implementation="eager", seed=17),
                                           _batch(0)))
            full = float(_reference_loss(hf.build_causal_lm(_config(name, full=True), attn_implementation="eager",
                                                            seed=17), _batch(0)))
        gaps[name] = abs(full - masked) / abs(masked)
    assert all(gap > SENSITIVITY * RTOL for gap in gaps.values()), gaps


def test_chunked_documents_restart_with_each_document():
    from lss_plugin.hf.layer_masks import chunked_documents

    cu = torch.tensor([0, 30, 35, 64], dtype=torch.int32)
    assert chunked_documents(cu, (0, 30, 35, 64), 24).tolist() == [0, 24, 30, 35, 59, 64]
    assert chunked_documents(cu, (0, 30, 35, 64), 24).dtype == torch.int32


# ---------------------------------------------------------------------------------------------
# Multi-rank

def _worst(four_ranks, keys):
    runs = [o[key] for o in four_ranks for key in keys]
    return (max(abs(l - r) / abs(r) for st, _ in runs for r, l, _, _ in st),
            max(e for st, _ in runs for _, _, e, _ in st), max(err for _, err in runs))


def test_families_train_exactly(four_ranks):
    keys = [(config, name) for config, *_ in CONFIGS for name in FAMILIES]
    for rank_out in four_ranks:
        for key in keys + [("sp4_packed", name) for name in PACKED_FAMILIES]:
            steps, params_err = rank_out[key]
            assert params_err <= RTOL, (key, params_err)
            for step, (ref_loss, loss, grad_err, sinks_err) in enumerate(steps):
                assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (key, step, loss, ref_loss)
                assert grad_err <= RTOL, (key, step, grad_err)
                assert (sinks_err is not None) == (key[1] == "gpt_oss"), key  # the sinks are a trained weight
                assert sinks_err is None or sinks_err <= RTOL, (key, step, sinks_err)
    print(f"\nHF masks, {len(FAMILIES)} families x {len(CONFIGS)} configs x {STEPS} steps, worst rel. errors:")
    for name in FAMILIES:
        loss, grad, param = _worst(four_ranks, [(config, name) for config, *_ in CONFIGS])
        print(f"  {name:8s} loss {loss:.2e}  gradients {grad:.2e}  parameters {param:.2e}")
    for name in PACKED_FAMILIES:
        loss, grad, param = _worst(four_ranks, [("sp4_packed", name)])
        print(f"  {name:8s} packed SP=4: loss {loss:.2e}  gradients {grad:.2e}  parameters {param:.2e}")
    sinks = max(s for o in four_ranks for key in keys if key[1] == "gpt_oss" for *_, s in o[key][0])
    print(f"  gpt_oss sinks gradient {sinks:.2e} (tolerance {RTOL})")


def test_mask_function_accepts_causal_sliding_chunked_and_refuses_overlays():
    """The mask interface recognises transformers' causal, sliding-window and chunked patterns by
    structure; image-token style overlays and bidirectional patterns are refused by name."""
    from transformers import masking_utils as mu

    from lss_plugin.hf.attention import _check_mask_request

    def check(fn):
        _check_mask_request(16, 16, 0, 0, fn, None, None)

    for fn in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(4),
               mu.chunked_causal_mask_function(6, torch.zeros(2, dtype=torch.long))):
        check(fn)
    overlay = mu.or_masks(mu.sliding_window_causal_mask_function(4), mu.causal_mask_function)  # e.g. image tokens
    for fn in (overlay, mu.bidirectional_mask_function, mu.sliding_window_bidirectional_mask_function(4),
               mu.and_masks(mu.causal_mask_function, mu.causal_mask_function)):
        with pytest.raises(ValueError, match="cannot reproduce the mask pattern"):
            check(fn)
