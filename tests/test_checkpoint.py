"""lss_plugin.checkpoint: round trip, atomicity under a crash, refusal of bad checkpoints, multi-rank saves."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch

from lss_plugin.checkpoint import (
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    has_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.distributed import run_ranks

MODEL = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 256}


def _trained_state(seed=0):
    """A model and Adam optimizer after one step: tensors, nested dicts, ints and floats."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).square().sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "consumed_samples": 96}


def _manifest(sp=2, dp=2, **model):
    return {"model": {**MODEL, **model}, "topology": {"sp": sp, "dp": dp, "tp": 1},
            "settings": {"lr": 1e-3, "seed": 1234}}


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_bit_exact_and_records_the_manifest(tmp_path):
    state = _trained_state()
    path = save_checkpoint(str(tmp_path), 100, state, _manifest())
    assert path == str(tmp_path / "iter_0000100")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000100", LATEST_FILE]  # no temp dir left
    iteration, loaded, manifest = load_checkpoint(str(tmp_path), expected_manifest=_manifest())
    assert iteration == 100
    _assert_same(state, loaded)
    assert manifest["topology"] == {"sp": 2, "dp": 2, "tp": 1} and manifest["world_size"] == 1
    assert set(manifest["files"]) == {STATE_FILE}
    assert manifest["files"][STATE_FILE]["bytes"] == os.path.getsize(tmp_path / "iter_0000100" / STATE_FILE)


def test_other_sp_and_dp_sizes_load(tmp_path):
    save_checkpoint(str(tmp_path), 5, _trained_state(), _manifest(sp=4, dp=1))
    iteration, _, manifest = load_checkpoint(str(tmp_path), expected_manifest=_manifest(sp=2, dp=2))
    assert iteration == 5 and manifest["topology"]["sp"] == 4


def test_latest_moves_and_an_older_iteration_stays_loadable(tmp_path):
    save_checkpoint(str(tmp_path), 10, _trained_state(0), _manifest())
    save_checkpoint(str(tmp_path), 20, _trained_state(1), _manifest())
    assert latest_checkpoint(str(tmp_path)) == "iter_0000020"
    _, old, _ = load_checkpoint(str(tmp_path), iteration=10)
    _assert_same(old["model"], _trained_state(0)["model"])
    save_checkpoint(str(tmp_path), 30, _trained_state(2), _manifest(), keep_last=2)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("iter")) == ["iter_0000020", "iter_0000030"]


def test_resaving_an_iteration_replaces_it_only_after_latest_moved(tmp_path):
    save_checkpoint(str(tmp_path), 10, _trained_state(0), _manifest())
    path = save_checkpoint(str(tmp_path), 10, _trained_state(1), _manifest())
    assert path.endswith("iter_0000010.1") and not os.path.exists(tmp_path / "iter_0000010")
    _, loaded, _ = load_checkpoint(str(tmp_path))
    _assert_same(loaded["model"], _trained_state(1)["model"])


class _CrashWhilePickled:
    """Pickling this kills the process on the spot: a crash in the middle of writing the state."""

    def __reduce__(self):
        os._exit(17)


def _save_then_crash(directory):
    torch.set_num_threads(1)
    save_checkpoint(directory, 10, _trained_state(0), _manifest())
    save_checkpoint(directory, 20, {**_trained_state(1), "boom": _CrashWhilePickled()}, _manifest())
    os._exit(0)  # not reached


def test_crash_mid_save_leaves_the_previous_checkpoint_latest_and_loadable(tmp_path):
    proc = mp.get_context("spawn").Process(target=_save_then_crash, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 17  # it really died inside the second save
    assert os.path.isdir(tmp_path / ".tmp-iter_0000020")  # the half-written save is still there
    assert not os.path.exists(tmp_path / "iter_0000020")
    assert latest_checkpoint(str(tmp_path)) == "iter_0000010"
    iteration, loaded, _ = load_checkpoint(str(tmp_path), expected_manifest=_manifest())
    assert iteration == 10
    _assert_same(loaded["model"], _trained_state(0)["model"])
    # The next save clears the debris and succeeds.
    save_checkpoint(str(tmp_path), 20, _trained_state(1), _manifest())
    assert load_checkpoint(str(tmp_path))[0] == 20 and not os.path.exists(tmp_path / ".tmp-iter_0000020")


def test_failed_save_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    save_checkpoint(str(tmp_path), 10, _trained_state(0), _manifest())
    with pytest.raises(CheckpointError, match="writing the replicated state"):
        save_checkpoint(str(tmp_path), 20, {"fn": lambda: None}, _manifest())  # lambdas do not pickle
    assert sorted(os.listdir(tmp_path)) == ["iter_0000010", LATEST_FILE]
    assert load_checkpoint(str(tmp_path))[0] == 10


def test_truncated_or_corrupted_checkpoints_are_refused(tmp_path):
    save_checkpoint(str(tmp_path), 10, _trained_state(0), _manifest())
    save_checkpoint(str(tmp_path), 20, _trained_state(1), _manifest())
    state_file = tmp_path / "iter_0000020" / STATE_FILE
    blob = state_file.read_bytes()
    state_file.write_bytes(blob[: len(blob) // 2])
    truncated = rf"truncated or altered: {len(blob) // 2} bytes, manifest says {len(blob)}"
    with pytest.raises(CheckpointError, match=truncated):
        load_checkpoint(str(tmp_path))
    state_file.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(CheckpointError, match="is corrupted: SHA-256"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000020" / MANIFEST_FILE).write_text('{"format": "lss_plugin.checkp')
    with pytest.raises(CheckpointError, match="manifest.json is unreadable"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000020" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="is incomplete: it has no manifest.json"):
        load_checkpoint(str(tmp_path))
    assert load_checkpoint(str(tmp_path), iteration=10)[0] == 10  # the older one is intact


def test_missing_checkpoints_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        load_checkpoint(str(tmp_path))
    assert not has_checkpoint(str(tmp_path)) and not has_checkpoint(None)
    save_checkpoint(str(tmp_path), 1, {"x": torch.zeros(1)}, {})
    assert has_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no checkpoint for iteration 7 .* \(found \[1\]\)"):
        load_checkpoint(str(tmp_path), iteration=7)
    # A damaged pointer is an error to report, not "no checkpoint, start from scratch".
    (tmp_path / LATEST_FILE).write_text("iter_00")
    assert has_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="holds 'iter_00', not a checkpoint name"):
        load_checkpoint(str(tmp_path))
    (tmp_path / LATEST_FILE).write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="points at 'iter_0000009', which does not exist"):
        load_checkpoint(str(tmp_path))


def test_incompatible_model_is_refused_with_the_differences(tmp_path):
    save_checkpoint(str(tmp_path), 10, _trained_state(), _manifest())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(tmp_path), expected_manifest=_manifest(hidden_size=64, num_kv_heads=2))
    message = str(info.value)
    assert "model.hidden_size: checkpoint has 32, this run has 64" in message
    assert "model.num_kv_heads: checkpoint has '<absent>', this run has 2" in message
    assert load_checkpoint(str(tmp_path), expected_manifest=_manifest())[0] == 10  # still there


def test_bad_save_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="iteration must be a non-negative integer, got -1"):
        save_checkpoint(str(tmp_path), -1, {}, {})
    with pytest.raises(ValueError, match=r"manifest keys \['files'\] are reserved"):
        save_checkpoint(str(tmp_path), 1, {}, {"files": {}})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(str(tmp_path), 1, {}, {"model": {"dtype": torch.float32}})
    assert os.listdir(tmp_path) == []


def _multi_rank_saves(directory):
    import torch.distributed as dist

    rank = dist.get_rank()
    replicated = {"w": torch.arange(6.0)}
    out = {}
    own = {"rank": rank, "shard": torch.full((2,), rank)}
    path = save_checkpoint(directory, 3, replicated, _manifest(), rank_state=own)
    out["path"] = path
    _, state, manifest = load_checkpoint(directory, expected_manifest=_manifest())
    out["rank_state"] = (state["rank_state"]["rank"], state["rank_state"]["shard"].tolist())
    out["files"] = sorted(manifest["files"])
    # A failure on rank 1 only: every rank raises, the checkpoint of iteration 3 stays latest.
    bad = {"fn": (lambda: None)} if rank == 1 else {"ok": 1}
    try:
        save_checkpoint(directory, 4, replicated, _manifest(), rank_state=bad)
    except CheckpointError as exc:
        out["error"] = str(exc)
    dist.barrier()
    out["latest"] = latest_checkpoint(directory)
    return out


@pytest.mark.timeout(240)
def test_two_rank_save_with_per_rank_state_and_a_failure_on_one_rank(tmp_path):
    results = run_ranks(_multi_rank_saves, 2, str(tmp_path), timeout_s=180)
    for rank, out in enumerate(results):
        assert out["path"] == str(tmp_path / "iter_0000003")
        assert out["rank_state"] == (rank, [float(rank)] * 2)
        assert out["files"] == ["rank_00000.pt", "rank_00001.pt", STATE_FILE]
        assert out["latest"] == "iter_0000003"
    assert "writing per-rank state" in results[1]["error"] and "pickle" in results[1]["error"].lower()
    assert "failed on another rank" in results[0]["error"]
    assert not os.path.exists(tmp_path / "iter_0000004") and not os.path.exists(tmp_path / ".tmp-iter_0000004")
    # Per-rank state does not carry over to a rank that did not write any.
    with pytest.raises(CheckpointError, match="rank 2 has none"):
        load_checkpoint(str(tmp_path), rank=2)
    manifest = json.loads((tmp_path / "iter_0000003" / MANIFEST_FILE).read_text())
    assert manifest["world_size"] == 2
