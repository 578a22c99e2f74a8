"""Double gradient averaging: LSS training over SP x DP equals one-process training.

5 AdamW steps of the reference GPT from the same initial weights on the same global batch.
Tolerances: float64 per-step losses and final weights within 1e-10 (max abs difference relative
to the largest value); float32 losses within 1e-5 relative and weights within 1e-5 in relative
norm (||w - w_ref|| / ||w_ref||: Adam divides by sqrt(v), so a float32 rounding difference in a
near-zero gradient moves that one weight by up to ~lr; elementwise max is not a fair float32 bound).
"""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lss_plugin
from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions
from lss_plugin.sharding import local_token_indices
from tests.distributed import run_ranks

SEQ, BATCH, STEPS = 24, 4, 5
LR = 1e-3


def _global_batch(ignore: bool, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    if ignore:
        # Uneven: the first quarter of every position in the first half of the batch (a whole
        # shard under contiguous SP=4 on DP rank 0) plus ~30% of all other labels.
        labels[: BATCH // 2, : SEQ // 4] = -100
        labels[torch.rand(labels.shape, generator=gen) < 0.3] = -100
    return inputs, labels


def _reference_run(model, inputs, labels):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _lss_run(sp, mode, layout, position, dtype, ignore):
    topo = lss_plugin.init_topology(sp)
    torch.manual_seed(0)
    config = GPTConfig(max_seq_length=SEQ, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       position_embedding=position, tie_embeddings=position == "learned")
    reference = GPT(config).to(dtype)
    model = GPT(config, LSSAttentionOptions(layout=layout)).to(dtype)
    model.load_state_dict(reference.state_dict())
    inputs, labels = _global_batch(ignore)
    ref_losses = _reference_run(reference, inputs, labels)

    rows = slice(topo.dp_rank * BATCH // topo.dp_size, (topo.dp_rank + 1) * BATCH // topo.dp_size)
    idx = local_token_indices(SEQ, topo.sp_rank, sp, layout)
    local_inputs, local_labels = inputs[rows][:, idx], labels[rows][:, idx]
    positions = lss_plugin.local_positions(SEQ, layout=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, replicas_identical, grad_calls = [], True, []
    for _ in range(STEPS):
        opt.zero_grad()
        out = lss_plugin.sharded_cross_entropy(model(local_inputs, positions), local_labels, group=topo.sp_group)
        out.loss.backward()
        num_tokens = out.num_tokens if ignore else None
        with lss_plugin.record_collectives() as rec:
            lss_plugin.average_gradients(model.parameters(), topo, mode=mode, num_tokens=num_tokens)
        grad_calls.append(rec.calls["all_reduce"])
        opt.step()
        losses.append(lss_plugin.reduce_loss(out.local_mean, topo, num_tokens=out.num_tokens).item())
        mine = _flat(model)
        copies = [torch.empty_like(mine) for _ in range(sp)]
        dist.all_gather(copies, mine, group=topo.sp_group)
        replicas_identical &= all(torch.equal(c, copies[0]) for c in copies)
    ref_w, w = _flat(reference), _flat(model)
    lss_plugin.destroy_topology()
    return dict(
        loss_err=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        weight_err=((w - ref_w).abs().max() / ref_w.abs().max()).item(),
        weight_norm_err=((w - ref_w).norm() / ref_w.norm()).item(),
        replicas_identical=replicas_identical,
        grad_calls=grad_calls,
    )


def _sweep(sps, dtype_name, configs):
    dtype = getattr(torch, dtype_name)
    return [((sp,) + cfg, _lss_run(sp, *cfg[:3], dtype, cfg[3])) for sp in sps for cfg in configs]


ALL = list(itertools.product(("two_stage", "fused"), ("contiguous", "balanced"), ("learned", "rope"), (False,)))
UNEVEN = [("two_stage", "contiguous", "learned", True), ("fused", "balanced", "rope", True),
          ("two_stage", "balanced", "learned", True)]


def _expected_grad_calls(sp, dp, mode, weighted):
    # One bucket for this small model; token counts ride in it except for fused's SP pre-count.
    if mode == "two_stage":
        return int(sp > 1) + int(dp > 1)
    return 1 + int(weighted and sp > 1)


def _check(results, world, tol, weight_metric="weight_err"):
    for (sp, mode, layout, position, ignore), r in results:
        case = (sp, mode, layout, position, ignore)
        assert r["loss_err"] < tol and r[weight_metric] < tol, (case, r)
        assert r["replicas_identical"], case
        expected = _expected_grad_calls(sp, world // sp, mode, ignore)
        assert r["grad_calls"] == [expected] * STEPS, (case, r["grad_calls"], expected)


def test_four_ranks_float64_equals_one_process():
    """SP=4, SP=2 x DP=2 and SP=1 x DP=4; both modes, layouts and position schemes; uneven tokens."""
    for results in run_ranks(_sweep, 4, (4, 2, 1), "float64", ALL + UNEVEN, timeout_s=600):
        _check(results, 4, 1e-10)


def test_three_ranks_sp3_float64_equals_one_process():
    for results in run_ranks(_sweep, 3, (3,), "float64", ALL + UNEVEN, timeout_s=600):
        _check(results, 3, 1e-10)


def test_float32_within_1e5_relative():
    configs = [("two_stage", "balanced", "rope", False), ("fused", "contiguous", "learned", True)]
    for results in run_ranks(_sweep, 4, (2,), "float32", configs, timeout_s=600):
        _check(results, 4, 1e-5, weight_metric="weight_norm_err")


def _bad_args():
    topo = lss_plugin.init_topology(dist.get_world_size())
    p = torch.nn.Parameter(torch.ones(2))
    errors = []
    for kwargs in ({"mode": "triple"}, {"num_tokens": -1}):
        try:
            lss_plugin.average_gradients([p], topo, **kwargs)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_bad_arguments_are_named():
    errors = run_ranks(_bad_args, 1)[0]
    assert "mode must be one of ('two_stage', 'fused'), got 'triple'" in errors[0]
    assert "num_tokens must be a non-negative integer, got -1" in errors[1]


def test_zero_token_loss_is_zero_not_nan():
    logits = torch.randn(1, 4, 256, requires_grad=True)
    out = lss_plugin.sharded_cross_entropy(logits, torch.full((1, 4), -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_tokens == 0 and torch.all(logits.grad == 0)


def _unused_on_some_ranks():
    topo = lss_plugin.init_topology(dist.get_world_size())
    used, unused = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    used.grad = torch.full((3,), float(dist.get_rank() + 1))
    if dist.get_rank() == 1:  # only rank 1 computed a gradient for this one
        unused.grad = torch.full((2,), 4.0)
    lss_plugin.average_gradients([used, unused], topo)
    return used.grad.tolist(), unused.grad.tolist()


def test_a_parameter_without_gradient_on_some_ranks_counts_as_zeros():
    for used, unused in run_ranks(_unused_on_some_ranks, 2):
        assert used == [1.5] * 3 and unused == [2.0] * 2
