"""Dropout under LSS: one random stream per sequence-parallel rank, and its checkpoint state.

The ``N`` ranks of a sequence-parallel group hold different tokens of the same sequences. Seeded
alike, they draw the same dropout mask for every segment, a correlation one device never has: it
draws every position's mask independently. So after the model is built (its weights are drawn
before, and stay identical on every rank) every SP rank moves to a stream of its own.

Seeds follow Megatron-LM: ``_set_random_seed`` (megatron/training/initialize.py) gives each
pipeline stage ``seed + 100 * pp_rank`` (``+ 10 * dp_rank`` only with
``--data-parallel-random-init``, which changes the initial weights too: by default data-parallel
replicas share their streams, as they do under ``transformers.Trainer``'s ``set_seed``, since they
hold other rows), then ``model_parallel_cuda_manual_seed``
(megatron/core/tensor_parallel/random.py) uses that seed for the default stream (shared by the
tensor-parallel ranks, which hold the same activations) and ``seed + 2718 + tp_rank`` for the
tracker's tensor-parallel stream (where Megatron's sequence-parallel hidden dropout runs).
Megatron's own context-parallel ranks share the seed; LSS adds ``SP_SEED_STRIDE * sp_rank``, so
SP rank 0 keeps exactly Megatron's streams and the other ranks stay clear of Megatron's offsets
(``100 * pp``, ``2718 + tp``, ``1024 + 100 * ep + etp``).

DeepSpeed and transformers take no seed: there the SP ranks leave the stream the caller seeded
(the same on every rank, or the weights would differ) at ``deepspeed.initialize``; SP rank 0
keeps it and rank ``r`` continues from ``sequence_parallel_seed(b, r)``, ``b`` drawn from a copy of
that stream. Per-rank states for checkpoints: ``rng_state``/``set_rng_state`` (CPU and the current
CUDA device, plus Megatron's tracker), and ``all_rank_rng_states``/``restore_rank_rng_state`` for
a checkpoint that keeps every rank's streams beside the layout they belong to.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Prime, and above every offset Megatron adds for fewer than 10,000 pipeline stages or experts.
SP_SEED_STRIDE = 1_000_003
PIPELINE_SEED_STRIDE = 100  # Megatron-LM's _set_random_seed
_SEED_MODULUS = 2 ** 63  # torch.manual_seed takes any integer below 2 ** 64


def sequence_parallel_seed(seed: int, sp_rank: int, pp_rank: int = 0) -> int:
    """The seed of SP rank ``sp_rank`` on pipeline stage ``pp_rank`` (Megatron's when ``sp_rank == 0``)."""
    for name, value in (("seed", seed), ("sp_rank", sp_rank), ("pp_rank", pp_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return (seed + PIPELINE_SEED_STRIDE * pp_rank + SP_SEED_STRIDE * sp_rank) % _SEED_MODULUS


def seed_megatron_rng(seed: int, *, sp_rank: int | None = None, pp_rank: int | None = None) -> int:
    """Seed megatron-core's streams for this rank, distinct per LSS (context-parallel) rank.

    Call after the model is built: ``torch.manual_seed`` (CPU and every CUDA device) and
    ``model_parallel_cuda_manual_seed`` (default CUDA stream, tracker's TP and expert streams)
    with ``sequence_parallel_seed(seed, sp_rank, pp_rank)``; the ranks default to megatron-core's
    context-parallel and pipeline ranks. Returns that seed.
    """
    from megatron.core import parallel_state, tensor_parallel

    if sp_rank is None:
        sp_rank = parallel_state.get_context_parallel_rank()
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    rank_seed = sequence_parallel_seed(seed, sp_rank, pp_rank)
    torch.manual_seed(rank_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(rank_seed)
    return rank_seed


def fork_sequence_parallel_rng(sp_rank: int) -> int | None:
    """Move SP rank ``sp_rank > 0`` off the stream the caller seeded (rank 0 keeps it).

    The new seed is ``sequence_parallel_seed(b, sp_rank)`` with ``b`` drawn from a copy of the CPU
    generator, so it is a function of the caller's seed; the CPU generator and every CUDA device's
    are reseeded with it. Returns the seed, or None on rank 0.
    """
    if not isinstance(sp_rank, int) or isinstance(sp_rank, bool) or sp_rank < 0:
        raise ValueError(f"sp_rank must be a non-negative integer, got {sp_rank!r}")
    if sp_rank == 0:
        return None
    copy = torch.Generator()
    copy.set_state(torch.get_rng_state())  # a copy: drawing b moves no rank's stream
    base = int(torch.randint(0, _SEED_MODULUS - 1, (1,), generator=copy))
    rank_seed = sequence_parallel_seed(base, sp_rank)
    torch.manual_seed(rank_seed)
    return rank_seed


def rng_state(tracker=None) -> dict:
    """This rank's streams: the CPU generator, the current CUDA device's, and ``tracker``'s states."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict, tracker=None) -> None:
    """Restore what ``rng_state`` returned (the same keys must be there)."""
    missing = [k for k in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()) +
               (("tracker",) if tracker is not None else ()) if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing} (it has {sorted(state)})")
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None:
        tracker.set_states(state["tracker"])


def all_rank_rng_states(layout: dict, tracker=None, group=None) -> dict:
    """``{"layout": layout, "ranks": [rng_state of rank 0, 1, ...]}`` over ``group`` (collective).

    ``layout`` says which streams these are (sizes of every parallel dimension): a run restores
    them only under the same layout, where rank ``r`` is the same (tp, sp, dp, pp) coordinate.
    """
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, rng_state(tracker), group=group)
    return {"layout": dict(layout), "ranks": states}


def restore_rank_rng_state(saved: dict | None, layout: dict, tracker=None, group=None) -> bool:
    """Restore this rank's streams from ``all_rank_rng_states``; False (nothing restored) when
    ``saved`` has none or was written under another layout: the caller seeds afresh then."""
    if not saved or "ranks" not in saved or saved.get("layout") != dict(layout):
        return False
    ranks = saved["ranks"]
    if len(ranks) != dist.get_world_size(group):  # the layout says so too; never index past the list
        return False
    set_rng_state(ranks[dist.get_rank(group)], tracker)
    return True
