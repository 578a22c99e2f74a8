"""Simulated nodes on one machine (root): run a torchrun job across them, or soak it with kills.

    # 2 nodes x 2 ranks, 1 Gbit/s between nodes, unshaped inside each
    python -m lss_plugin.cluster run --nodes 2 --nproc-per-node 2 --rate 1gbit -- \\
        examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_lss.args --lss-ulysses-size 2
    # kill a random rank 5 times, resume from checkpoints, compare with an uninterrupted run
    python -m lss_plugin.cluster soak --kills 5 --nodes 2 --nproc-per-node 2 -- \\
        examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_lss.args \\
        --save {ckpt} --load {ckpt} --save-interval 3 --metrics-file {metrics}

Everything after ``--`` is what torchrun runs (a script and its arguments, or ``-m module ...``).
Exit status: the first non-zero exit of a node's torchrun (soak: 1 when the losses differ by more
than --rtol or iterations are missing), 3 when namespaces cannot be made here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.cluster", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("run", "soak"):
        s = sub.add_parser(name)
        s.add_argument("--nodes", type=int, default=2)
        s.add_argument("--nproc-per-node", type=int, default=1)
        s.add_argument("--rate", default="1gbit", help="tc rate of each node's link (1gbit, 200mbit); 'none': unshaped")
        s.add_argument("--delay", default=None, help="one-way delay added on each node's link (needs tc netem)")
        s.add_argument("--no-netns", action="store_true",
                       help="one node: a plain torchrun on this host's loopback (no namespaces, no root)")
        s.add_argument("--log-dir", default=None)
        s.add_argument("--timeout-s", type=float, default=None)
        if name == "run":
            s.add_argument("--max-restarts", type=int, default=0)
        else:
            s.add_argument("--kills", type=int, default=5)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--rtol", type=float, default=1e-6)
            s.add_argument("--workdir", default=None, help="checkpoints, metrics and logs (default: a temp dir)")
            s.add_argument("--json", default=None, help="write the summary here")
        s.add_argument("command", nargs=argparse.REMAINDER)
    return p


def _prefetch_default_corpus() -> None:
    """The nodes have no route out: fetch the examples' default text into the cache now."""
    from lss_plugin.data import ensure_default_corpus

    try:
        ensure_default_corpus()
    except Exception as err:  # noqa: BLE001 - only the examples' default data needs it
        print(f"lss_plugin.cluster: the default training text is not cached ({err}); commands that "
              f"need it will fail inside the nodes, which have no network", file=sys.stderr)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("lss_plugin.cluster: no command given (put it after --)", file=sys.stderr)
        return 2
    from lss_plugin.cluster import launch, net

    rate = None if args.rate == "none" else args.rate
    if not args.no_netns:
        reason = net.unavailable()
        if reason:
            print(f"lss_plugin.cluster: cannot make network namespaces here: {reason}", file=sys.stderr)
            return 3
    elif args.nodes != 1:
        print(f"lss_plugin.cluster: --no-netns runs one node, not {args.nodes}", file=sys.stderr)
        return 2
    _prefetch_default_corpus()
    launch.install_signal_handlers()
    try:
        return _act(args, command, rate)
    except (KeyboardInterrupt, launch.Interrupted) as why:
        print(f"lss_plugin.cluster: interrupted ({str(why) or 'Ctrl-C'}); nodes and processes removed", file=sys.stderr)
        return 130


def _act(args, command: list[str], rate: str | None) -> int:
    from lss_plugin.cluster import launch

    if args.action == "run":
        codes = launch.run(args.nodes, args.nproc_per_node, command, rate=rate, delay=args.delay,
                           max_restarts=args.max_restarts, log_dir=args.log_dir, timeout_s=args.timeout_s,
                           use_netns=not args.no_netns)
        print(f"lss_plugin.cluster: node exit codes {codes}", file=sys.stderr)
        return next((c for c in codes if c), 0)
    from lss_plugin.cluster.soak import soak

    workdir = args.workdir or tempfile.mkdtemp(prefix="lss-soak-")
    out = soak(command, workdir, nodes=args.nodes, nproc=args.nproc_per_node, kills=args.kills, seed=args.seed,
               rate=rate, use_netns=not args.no_netns, timeout_s=args.timeout_s or 3600.0)
    for k in out["kills"]:
        print(f"kill rank {k['rank']} after iteration {k['after_iteration']} (last logged before the restart: "
              f"{k.get('last_logged')}): resumed at iteration {k.get('resumed_at')}, steps lost {k.get('steps_lost')}")
    print(f"iterations {out['iterations']}, missing {out['missing_iterations']}, final loss "
          f"{out['final_loss']['soak']!r} (uninterrupted {out['final_loss']['reference']!r}), "
          f"largest relative loss difference {out['max_rel_loss_diff']!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    ok = (all(c == 0 for codes in out["codes"].values() for c in codes) and not out["missing_iterations"]
          and out["max_rel_loss_diff"] is not None and out["max_rel_loss_diff"] <= args.rtol
          and len(out["kills"]) == args.kills)
    print(f"soak: {'PASS' if ok else 'FAIL'} (workdir {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
