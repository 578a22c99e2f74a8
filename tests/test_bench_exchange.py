"""The sparse-exchange benchmark (``python -m lss_plugin.bench.exchange``) at a tiny size: 2 ranks, L = 256, one
round, no link limit. Its JSON must hold every row, each with gather, sparse and auto; the sparse all-to-alls
must have sent, on every rank, exactly the plan's floor plus one 80-byte signature row per peer (recomputed
here from ``exchange_plan``, not read back from the benchmark); auto never sends more than gather; auto runs
what ``resolve_kv_exchange`` picks. No timing is asserted.
"""
import json

from lss_plugin.bench.exchange import main
from lss_plugin.exchange import exchange_plan, resolve_kv_exchange
from lss_plugin.signature import SIGNATURE_BYTES

RANKS, L, HEADS, HEAD_DIM = 2, 256, 4, 64


def test_tiny_run_sends_the_floor_plus_signature_rows(tmp_path):
    assert main(["--ranks", str(RANKS), "--seq-len", str(L), "--repetitions", "1", "--link-gbit", "none",
                 "--windows", "L/16,L/4", "--doc-lens", "32,128", "--random-doc-mean", "32",
                 "--gqa-kv-heads", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "exchange.json").read_text())
    assert (tmp_path / "exchange.md").exists() and (tmp_path / "exchange.png").exists()
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"causal", "window=16", "window=64", "docs=32", "docs=128", "docs~32",
                         "causal gqa2", "window=64 gqa2", "docs~32 gqa2"}
    for name, r in rows.items():
        hkv = r["kv_heads"]
        assert r["head_chunk"] == hkv and r["kv_backward"] == "keep", r  # tiny: one call each way
        window = None if r["window"] is None else tuple(r["window"])
        plan = exchange_plan("balanced", RANKS, L // RANKS, True, tuple(r["bounds"]), window)
        token = 2 * hkv * HEAD_DIM * 4  # one token's K and V in float32
        want = [(plan.sent(k) + plan.received(k)) * token + (RANKS - 1) * SIGNATURE_BYTES for k in range(RANKS)]
        assert r["sparse"]["ran"] == "sparse" and r["sparse"]["all_to_all_sent_per_rank"] == want, (name, want, r)
        # the gather's dK/dV go back by one all-to-all on gloo (its reduce-scatter would be an all-reduce):
        # (N - 1) / N of the staged L tokens leave each rank
        dkv = L * token * (RANKS - 1) // RANKS
        assert r["gather"]["ran"] == "gather" and r["gather"]["all_to_all_sent_per_rank"] == [dkv] * RANKS, r
        assert r["auto"]["ran"] == r["auto_picks"] == resolve_kv_exchange("auto", plan), name
        assert r["auto"]["sent_bytes"] <= r["gather"]["sent_bytes"], (name, r["auto"], r["gather"])
        for ex in ("gather", "sparse", "auto"):
            assert len(r[ex]["round_step_s"]) == 1 and r[ex]["step_s"] > 0
    # rows that read nothing across ranks send the signature rows alone
    assert rows["docs=32"]["sparse"]["all_to_all_sent_per_rank"] == [(RANKS - 1) * SIGNATURE_BYTES] * RANKS
    assert rows["window=16"]["sparse"]["bytes_vs_gather"] < 0.2  # a 16-key halo against 256 keys gathered
