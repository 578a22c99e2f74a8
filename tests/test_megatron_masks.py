"""megatron-core's sliding windows (``window_size``, ``window_attn_skip_freq``) and softmax types
(``off-by-one``, ``learnable`` sinks) under LSS, against megatron-core's own attention.

- Training (``lss_plugin.megatron.pretrain``, a real GPTModel in megatron-core DDP): LSS SP = 2 against
  one rank, whose attention is megatron-core's local ``DotProductAttention`` with the same config:
  every iteration's loss and clipping norm within 1e-5 relative (float32), the first iteration's
  reduced gradients (the learnable ``softmax_offset`` included) within 1e-5 of the largest, and after
  the last step the saved ``softmax_offset`` (so it had a ``main_grad`` and the torch optimizer moved
  it) within 1e-5. Cases: a 7-key window (7, 0) on every layer; ``window_attn_skip_freq`` 2 (layer 2
  full) and the list [0, 1] (layer 1 full) with a window wider than a rank's tokens; learnable sinks;
  off-by-one; gpt-oss's mix (learnable sinks, window on alternate layers). Each masked reference
  differs from the plain model's (the mask is really applied). gpt-oss's mix also at TP = 2 (with
  Megatron SP) x LSS = 2: ``softmax_offset`` split over TP ranks, gathered whole into the checkpoint.
- The module on 2 ranks, both layouts, against megatron-core's ``DotProductAttention`` on the whole
  sequence: a both-sided window with ``no_mask``, (-1, 0) = plain causal, learnable sinks with a
  window (output, dQ/dK/dV rows and the sinks' gradient summed over the group); refusals by name on
  every rank (the baselines' core attentions refuse windows and sinks); ``sharded_state_dict`` shards ``softmax_offset`` like megatron-core's.
Runs under megatron-core 0.16.1 and 0.19.x (``make test-megatron-latest``): both releases have the fields.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_ranks
from tests.test_megatron import GRAD_RTOL, ITERS, LOSS_RTOL, _run_cases, case

SINK0 = "decoder.layers.0.self_attention.core_attention.softmax_offset"
SINK1 = "decoder.layers.1.self_attention.core_attention.softmax_offset"
QKV1 = "decoder.layers.1.self_attention.linear_qkv.weight"
LSS = ["--lss-sequence-parallel"]
CONTIGUOUS = ["--lss-layout", "contiguous"]
LEARNABLE = ["--softmax-type", "learnable"]
WINDOW = ["--window-size", "7,0"]  # 8 keys with the query's own; s_local = 32, balanced chunks of 16
SKIP2 = ["--window-attn-skip-freq", "2"]  # layer 1 windowed, layer 2 full


def _masked_case(pos, masked, *flags, save=None):
    spec = case(pos, masked, *flags, *(["--save", save, "--save-interval", str(ITERS)] if save else []))
    spec["probes"] += (QKV1,) + ((SINK0, SINK1) if "learnable" in flags else ())
    return spec


# name -> (position embedding, uneven loss mask, model flags, saves a checkpoint)
MODELS = {
    "window": ("rope", True, WINDOW, False),
    "window_skip_freq": ("rope", False, [*WINDOW, *SKIP2], False),
    # layer 1 full, layer 2 windowed with 40 keys back: more than a rank's 32 tokens
    "window_pattern": ("learned_absolute", True, ["--window-size", "40,0", "--window-attn-skip-freq", "[0,1]"], False),
    "learnable": ("rope", True, LEARNABLE, True),
    "off_by_one": ("rope", False, ["--softmax-type", "off-by-one"], False),
    "gpt_oss": ("rope", True, [*LEARNABLE, *WINDOW, *SKIP2], True),
}
LAYOUT = {"window": [], "window_skip_freq": CONTIGUOUS, "window_pattern": CONTIGUOUS, "learnable": [],
          "off_by_one": CONTIGUOUS, "gpt_oss": CONTIGUOUS}


def cases(ckpt, lss: bool):
    out = {}
    for name, (pos, masked, flags, saves) in MODELS.items():
        extra = [*LSS, *LAYOUT[name]] if lss else []
        out[name] = _masked_case(pos, masked, *flags, *extra, save=ckpt[(name, lss)] if saves else None)
    if not lss:  # the plain models the masked ones must differ from
        out["plain_rope_masked"] = case("rope", True)
        out["plain_rope"] = case("rope", False)
    return out


# TP = 2 x LSS = 2 (4 ranks): softmax_offset split over TP ranks (2 heads each), gathered for the
# checkpoint and counted once per TP rank in the clipping norm. Reference: runs1["gpt_oss"].
TP_CASE = "gpt_oss_tp2xsp2"


def tp_cases(ckpt):
    pos, masked, flags, _ = MODELS["gpt_oss"]
    return {TP_CASE: _masked_case(pos, masked, *flags, *LSS, "--tensor-model-parallel-size", "2",
                                  "--lss-sequence-parallel-size", "2", "--sequence-parallel",
                                  save=ckpt[(TP_CASE, True)])}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_masks_ckpt")
    return {(name, lss): str(root / f"{name}_{'lss' if lss else 'one'}")
            for name in (*MODELS, TP_CASE) for lss in (True, False)}


@pytest.fixture(scope="module")
def runs4(ckpt):
    return run_ranks(_run_cases, 4, tp_cases(ckpt), timeout_s=600, pg_timeout_s=120)


@pytest.fixture(scope="module")
def runs2(ckpt):
    return run_ranks(_run_cases, 2, cases(ckpt, lss=True), timeout_s=420, pg_timeout_s=120)


@pytest.fixture(scope="module")
def runs1(ckpt):
    return run_ranks(_run_cases, 1, cases(ckpt, lss=False), timeout_s=300, pg_timeout_s=120)[0]


def _saved_sinks(directory):
    from lss_plugin.checkpoint import load_checkpoint

    _, state, _ = load_checkpoint(directory)
    return {name: state["model"][name].numpy() for name in (SINK0, SINK1)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_losses_and_gradients_match_one_rank(name, runs2, runs1):
    _assert_matches(name, runs2, runs1[name])


@pytest.mark.slow
def test_learned_sinks_under_tensor_parallelism_match_one_rank(ckpt, runs4, runs1):
    _assert_matches(TP_CASE, runs4, runs1["gpt_oss"])
    got, ref = _saved_sinks(ckpt[(TP_CASE, True)]), _saved_sinks(ckpt[("gpt_oss", False)])
    for param in (SINK0, SINK1):  # gathered from both TP ranks: all 4 heads, the one-rank values
        assert got[param].shape == (4,) and np.abs(got[param] - ref[param]).max() <= 1e-5 * np.abs(ref[param]).max()


def _assert_matches(name, per_rank, ref):
    worst_loss = worst_grad = 0.0
    for rank, results in enumerate(per_rank):
        got = results[name]
        assert got["iterations"] == ref["iterations"] == list(range(1, ITERS + 1))
        for loss, ref_loss, norm, ref_norm in zip(got["losses"], ref["losses"], got["grad_norms"], ref["grad_norms"]):
            assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (rank, loss, ref_loss)
            assert abs(norm - ref_norm) <= LOSS_RTOL * ref_norm, (rank, norm, ref_norm)
            worst_loss = max(worst_loss, abs(loss - ref_loss) / abs(ref_loss))
        assert got["tokens"] == ref["tokens"]
        assert set(got["probes"]) == set(ref["probes"])
        for param, grad in got["probes"].items():
            scale = np.abs(ref["probes"][param]).max()
            assert scale > 0, param
            err = np.abs(grad - ref["probes"][param]).max() / scale
            assert err <= GRAD_RTOL, (rank, param, err)
            worst_grad = max(worst_grad, err)
    print(f"\n{name}: worst loss deviation {worst_loss:.2e} (relative), worst gradient {worst_grad:.2e}")


@pytest.mark.slow
def test_masks_change_the_reference(runs1):
    """Each reference really applies its mask or softmax: its gradients are not the plain model's by
    far more than the tolerance (its losses differ too, less: the model starts near uniform)."""
    for name, (pos, masked, _, _) in MODELS.items():
        if pos != "rope":
            continue
        plain, got = runs1["plain_rope_masked" if masked else "plain_rope"], runs1[name]
        grad_diff = max(np.abs(got["probes"][p] - g).max() / np.abs(g).max() for p, g in plain["probes"].items())
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], plain["losses"]))
        print(f"\n{name}: differs from the plain model by {grad_diff:.1e} (gradients), {loss_diff:.1e} (losses)")
        assert grad_diff > 100 * GRAD_RTOL and loss_diff > 10 * LOSS_RTOL, (name, grad_diff, loss_diff)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, model in MODELS.items() if model[3]])
def test_learned_sinks_are_trained_and_saved_by_name(name, ckpt, runs2, runs1):
    """softmax_offset has a main_grad, is in the optimizer (it moved from its start) and reaches the
    checkpoint under megatron-core's name with the one-rank values."""
    got, ref = _saved_sinks(ckpt[(name, True)]), _saved_sinks(ckpt[(name, False)])
    for param in (SINK0, SINK1):
        assert got[param].shape == (4,)
        assert np.abs(got[param] - ref[param]).max() <= 1e-5 * np.abs(ref[param]).max(), param
        first_grad = runs1[name]["probes"][param]
        assert np.abs(first_grad).max() > 0, param  # AdamW moves every entry with a gradient by ~lr
    assert not np.allclose(got[SINK0], got[SINK1])  # drawn per name, not shared


# ---------------------------------------------------------------------------------------------
# The module against megatron-core's DotProductAttention, 2 ranks

L, B, HEADS, GROUPS, D = 16, 2, 4, 2, 8


def _module_cases():
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.baselines.megatron import SDPADotProductAttention
    from lss_plugin.megatron.attention import configured_lss_attention
    from lss_plugin.megatron.cpu_shim import apply_cpu_shim
    from lss_plugin.megatron.parallel import initialize_lss_model_parallel
    from lss_plugin.options import LAYOUTS
    from lss_plugin.sharding import local_token_indices

    apply_cpu_shim()
    initialize_lss_model_parallel(2, timeout_s=60)
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # megatron-core's attention forks this RNG (dropout)
    cp = parallel_state.get_context_parallel_group()
    rank, world = dist.get_rank(), dist.get_world_size()

    def config(cp=world, **fields):  # megatron-core's local attention (the reference) takes no CP
        return TransformerConfig(num_layers=2, hidden_size=HEADS * D, num_attention_heads=HEADS,
                                 num_query_groups=GROUPS, attention_dropout=0.0, context_parallel_size=cp,
                                 **fields)

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(L, B, HEADS, D, generator=gen)  # [L, b, h, d], the same on every rank
    k, v = (torch.randn(L, B, GROUPS, D, generator=gen) for _ in range(2))
    dout = torch.randn(L, B, HEADS * D, generator=gen)
    sinks = torch.randn(HEADS, generator=gen)

    def compare(fields, mask_type, reference_fields=None, layer=1):
        """Max relative errors of out, dq, dk, dv (and the sinks' gradient) against megatron-core."""
        cfg, ref_cfg = config(**fields), config(1, **(fields if reference_fields is None else reference_fields))
        ref_attn = DotProductAttention(ref_cfg, layer, mask_type, "self")
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        params = [p for p in ref_attn.parameters()]
        for p in params:
            p.data.copy_(sinks)
        ref_out = ref_attn(*full, None)  # [L, b, h*d]
        ref_out.backward(dout)
        out = {}
        for layout in LAYOUTS:
            idx = local_token_indices(L, rank, world, layout)
            attn = configured_lss_attention(layout=layout)(cfg, layer, mask_type, "self")
            for p in attn.parameters():
                p.data.copy_(sinks)
            local = [t[idx].clone().requires_grad_() for t in (q, k, v)]
            got = attn(*local, None)  # [s_local, b, h*d]
            got.backward(dout[idx])
            errs = {"out": got.detach() - ref_out.detach()[idx]}
            errs.update({name: t.grad - ref.grad[idx] for name, t, ref in zip("qkv", local, full)})
            refs = {"out": ref_out.detach()[idx], **{name: ref.grad[idx] for name, ref in zip("qkv", full)}}
            if params:
                grad = next(attn.parameters()).grad.clone()
                dist.all_reduce(grad, group=cp)  # each rank's queries' share
                errs["sinks"], refs["sinks"] = grad - params[0].grad, params[0].grad
            out[layout] = {n: float(errs[n].abs().max() / refs[n].abs().max()) for n in errs}
        return out

    def refusal(fields, mask_type, layer=1, cls=None):
        try:
            (cls or configured_lss_attention())(config(**fields), layer, mask_type, "self")
        except ValueError as err:
            return str(err)
        return None

    learnable = configured_lss_attention()(config(softmax_type="learnable"), 1, AttnMaskType.causal, "self")
    sharded = learnable.sharded_state_dict(
        prefix="attn.", metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})
    return {
        "exact": {
            "no_mask, window (3, 2)": compare({"window_size": (3, 2)}, AttnMaskType.no_mask),
            "causal, window (-1, 0) = causal": compare({"window_size": (-1, 0)}, AttnMaskType.causal,
                                                       reference_fields={}),
            "causal, window (5, 0), learnable sinks": compare({"window_size": (5, 0), "softmax_type": "learnable"},
                                                              AttnMaskType.causal),
            "causal, window skipped on layer 2, off-by-one": compare(
                {"window_size": (5, 0), "window_attn_skip_freq": 2, "softmax_type": "off-by-one"},
                AttnMaskType.causal, layer=2),
        },
        "refused": {
            "causal right": refusal({"window_size": (7, 3)}, AttnMaskType.causal),
            "short pattern": refusal({"window_size": (7, 0), "window_attn_skip_freq": [1]}, AttnMaskType.causal),
        },
        "baseline": [refusal(fields, AttnMaskType.causal, cls=SDPADotProductAttention)
                     for fields in ({"window_size": (7, 0)}, {"softmax_type": "off-by-one"})],
        "skipped": configured_lss_attention()(config(window_size=(7, 0), window_attn_skip_freq=[1, 0]), 2,
                                              AttnMaskType.causal, "self").window_size,
        "buffer": (type(configured_lss_attention()(config(softmax_type="off-by-one"), 1, AttnMaskType.causal,
                                                   "self").softmax_offset).__name__,
                   sorted(configured_lss_attention()(config(softmax_type="off-by-one"), 1, AttnMaskType.causal,
                                                     "self").state_dict())),
        "sharded": {key: (tuple(t.local_shape), tuple(t.global_shape)) for key, t in sharded.items()},
        "state": sorted(learnable.state_dict()),
    }


@pytest.fixture(scope="module")
def module_runs():
    return run_ranks(_module_cases, 2, timeout_s=300, pg_timeout_s=60)


def test_module_matches_megatron_core_attention(module_runs):
    for result in module_runs:
        for name, layouts in result["exact"].items():
            for layout, errs in layouts.items():
                for what, err in errs.items():
                    assert err < 1e-5, (name, layout, what, err)
        assert "sinks" in result["exact"]["causal, window (5, 0), learnable sinks"]["balanced"]
    worst = max(err for result in module_runs for layouts in result["exact"].values()
                for errs in layouts.values() for err in errs.values())
    print(f"\nLSSDotProductAttention vs DotProductAttention: worst relative error {worst:.2e}")


def test_module_refusals_name_the_setting_on_every_rank(module_runs):
    for result in module_runs:
        refused = result["refused"]
        assert refused["causal right"] is not None and "window_size=(7, 3) with attn_mask_type=causal" in \
            refused["causal right"], refused
        assert refused["short pattern"] is not None and "window_attn_skip_freq has 1 entries for num_layers=2" in \
            refused["short pattern"], refused
        assert result["skipped"] is None  # pattern [1, 0]: layer 2 attends fully
        # the baselines' kernels take neither: refused, not ignored
        assert result["baseline"] == ["SDPADotProductAttention does not support window_size=(7, 0)",
                                      "SDPADotProductAttention does not support softmax_type='off-by-one'"]


def test_softmax_offset_has_megatron_core_names_and_shards(module_runs):
    for result in module_runs:
        assert result["state"] == ["softmax_offset"]
        assert result["buffer"] == ("Tensor", [])  # off-by-one: zeros, not a parameter, not saved
        assert result["sharded"] == {"attn.softmax_offset": ((HEADS,), (HEADS,))}


# ---------------------------------------------------------------------------------------------
# Flags (no processes)

def _parse(*flags):
    from lss_plugin.megatron.pretrain import parse_args

    return parse_args(["--num-layers", "4", *flags], world_size=2)


def test_flags_use_megatron_lm_spellings():
    args = _parse("--window-size", "128,0", "--window-attn-skip-freq", "([1]*3+[0])", "--softmax-type", "learnable",
                  "--lss-sequence-parallel")
    assert args.window_size == (128, 0) and args.window_attn_skip_freq == [1, 1, 1, 0]
    assert args.softmax_type == "learnable"
    assert _parse("--window-size", "(7,0)", "--window-attn-skip-freq", "2").window_attn_skip_freq == 2


@pytest.mark.parametrize("flags, message", [
    (["--window-size", "7,3", "--lss-sequence-parallel"], "--window-size 7,3 with --lss-sequence-parallel"),
    (["--window-size", "7,0", "--window-attn-skip-freq", "[1,0]"], "2 entries for num_layers=4"),
    (["--window-attn-skip-freq", "2"], "without window_size"),
    (["--window-size", "7,-2"], "integers >= -1"),
])
def test_flags_are_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _parse(*flags)


def test_malformed_pattern_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _parse("--window-attn-skip-freq", "[__import__]")
    assert "may hold only digits" in capsys.readouterr().err
