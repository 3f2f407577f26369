"""``python -m benchmarks``: run the benchmarks and write ``benchmarks/results.md``."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import common

PARTS = ("micro", "overhead", "offload")  # the order they run in


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of fastapi_rwdb against the local stack (scripts/stack.sh up).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (short and few rounds); writes benchmarks/out/quick/results.md "
        "and leaves benchmarks/results.md alone",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all); the "
        "report keeps the other parts' figures from their last run; --only '' only rebuilds "
        "the report",
    )
    parser.add_argument("--seed", type=int, default=7, help="workload seed of the offload part")
    parser.add_argument("--output", type=Path, help="where to write the report")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


def _say(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run_part(part: str, quick: bool, seed: int) -> dict[str, Any]:
    if part == "micro":
        from . import micro

        return micro.run(quick=quick)
    if part == "overhead":
        from . import overhead

        return overhead.run(quick=quick)
    from . import offload

    return offload.run(quick=quick, seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.quick:
        common.OUT_DIR = common.OUT_DIR / "quick"
    output = args.output or (
        common.OUT_DIR / "results.md" if args.quick else common.BENCH_DIR / "results.md"
    )
    command = ".venv/bin/python -m benchmarks" + (" --quick" if args.quick else "")
    if set(args.parts) & {"overhead", "offload"}:
        _say("checking the stack")
        common.check_stack()
    started = time.monotonic()
    if args.parts:
        env = common.environment()
        common.save("environment", env)
    else:  # only rebuilding the report: keep the machine and versions of the runs
        env = common.load("environment") or common.environment()
    for part in [p for p in PARTS if p in args.parts]:
        _say(f"running {part}{' (quick)' if args.quick else ''}")
        t0 = time.monotonic()
        load_before = os.getloadavg()
        data = _run_part(part, args.quick, args.seed)
        data["meta"] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": time.monotonic() - t0,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "quick": args.quick,
        }
        common.save(part, data)
        _say(f"{part} done in {data['meta']['seconds']:.0f} s")

    results = {part: common.load(part) for part in PARTS}
    notes = []
    for part, data in results.items():
        if data is None:
            continue
        meta = data["meta"]
        lb, la = meta["load_before"], meta["load_after"]
        notes.append(
            f"{part}: run {meta['date']}, {meta['seconds']:.0f} s"
            f"{' (quick)' if meta['quick'] else ''}; 1-minute load average "
            f"{lb[0]:.2f} before, {la[0]:.2f} after (2 cores)"
        )
    from .report import write_report

    written = write_report(
        output,
        env,
        results["offload"],
        results["overhead"],
        results["micro"],
        command,
        notes,
    )
    _say(f"total {time.monotonic() - started:.0f} s; wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
