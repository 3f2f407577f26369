"""Where fastapi_rwdb's extra time goes on one route: a profile of each app, diffed.

    .venv/bin/python -m benchmarks.profile "POST /sync/items"
    .venv/bin/python -m benchmarks.profile "GET /sync/items/{id}" --token -n 3000

Both apps of the overhead benchmark serve the route ``n`` times under
``cProfile``, one after the other, in process. Sync endpoints and dependencies
run inline on the event loop's thread instead of the thread pool, so the
profiler sees them (it follows one thread only). The output lists the functions
whose own time or call count differs most between the apps, per request.

A deterministic profiler rather than a sampling one (py-spy, pyinstrument):
the two apps differ by a few dozen calls per request, which exact call counts
show and samples drown in noise.

Read the times with care: a deterministic profiler inflates small Python
functions, and a function that runs right after a database round trip is
often charged for the wait of a descheduled process. Call counts are exact;
``psycopg ... wait`` is time spent waiting for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
from typing import Any

import anyio.to_thread

from .apps import AdvancedAlchemy, Baseline, rwdb_app
from .common import ROOT, call, env, prepare_table, wait_replicas_have

Row = tuple[int, float]  # calls, own seconds


async def _inline(func: Any, *args: Any, **kwargs: Any) -> Any:
    return func(*args)


def _stats(profile: cProfile.Profile) -> dict[str, Row]:
    stats: dict[str, Row] = {}
    raw: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, calls, own, *_rest) in raw.items():
        short = filename.split("site-packages/")[-1].replace(f"{ROOT}/", "")
        stats[f"{short}:{line}({name})"] = (calls, own)
    return stats


def _app(name: str, w: int, r: int) -> Any:
    """``baseline`` (the hand-written pattern), ``aa`` (advanced-alchemy's routing),
    ``rwdb`` (fastapi_rwdb, defaults) or ``rwdb_off`` (``RWDB_PIN_MODE=off``)."""
    if name == "baseline":
        return Baseline(w, r).app()
    if name == "aa":
        return AdvancedAlchemy(w, r).app()
    if name == "rwdb_off":
        return rwdb_app(w, r, pin_mode="off")[0]
    return rwdb_app(w, r)[0]


async def _profile(
    route: str, n: int, token: bool, against: str = "baseline", subject: str = "rwdb"
) -> dict[str, dict[str, Row]]:
    method, template = route.split(maxsplit=1)
    ids = await asyncio.to_thread(prepare_table, 200)
    await asyncio.to_thread(wait_replicas_have, ids)
    w, r = int(env("POSTGRES_PORT")), int(env("POSTGRES_READ_PORT"))
    apps = {"baseline": _app(against, w, r), "rwdb": _app(subject, w, r)}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        return await _profile_apps(apps, method, template, ids, n, token)


async def _profile_apps(
    apps: dict[str, Any], method: str, template: str, ids: list[int], n: int, token: bool
) -> dict[str, dict[str, Row]]:
    headers: list[tuple[bytes, bytes]] = []
    if token:
        token_app = apps["rwdb"] if "rwdb" in apps else apps["baseline"]
        response = await call(token_app, "POST", "/sync/items")
        new_id = int(response.body.decode().split(":")[1].rstrip("}"))
        await asyncio.to_thread(wait_replicas_have, [new_id])
        headers = [(b"x-rwdb-pin", response.header(b"x-rwdb-pin") or b"")]
    anyio.to_thread.run_sync = _inline  # type: ignore[assignment]
    result = {}
    for name, app in apps.items():
        paths = [template.format(id=ids[i % len(ids)]) for i in range(n + 100)]
        for path in paths[:100]:  # warm-up
            await call(app, method, path, headers)
        profile = cProfile.Profile()
        profile.enable()
        for path in paths[100:]:
            response = await call(app, method, path, headers)
            assert response.status == 200, response.body
        profile.disable()
        result[name] = _stats(profile)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("route", help='method and path, e.g. "POST /sync/items"')
    parser.add_argument("-n", type=int, default=2000, help="requests per app")
    parser.add_argument("--token", action="store_true", help="send a valid token")
    parser.add_argument("--top", type=int, default=30)
    names = ("baseline", "aa", "rwdb", "rwdb_off")
    parser.add_argument(
        "--against", default="baseline", choices=names, help="the app compared with"
    )
    parser.add_argument("--subject", default="rwdb", choices=names, help="the app profiled")
    args = parser.parse_args(argv)
    stats = asyncio.run(_profile(args.route, args.n, args.token, args.against, args.subject))
    base, rwdb = stats["baseline"], stats["rwdb"]
    calls = {name: sum(c for c, _ in s.values()) / args.n for name, s in stats.items()}
    own = {name: sum(t for _, t in s.values()) / args.n * 1e6 for name, s in stats.items()}
    print(
        f"per request: {args.against} {calls['baseline']:.0f} calls, {own['baseline']:.0f} us; "
        f"{args.subject} {calls['rwdb']:.0f} calls, {own['rwdb']:.0f} us (profiled)"
    )
    rows = []
    for key in base.keys() | rwdb.keys():
        (bc, bt), (rc, rt) = base.get(key, (0, 0.0)), rwdb.get(key, (0, 0.0))
        rows.append(((rt - bt) / args.n * 1e6, (rc - bc) / args.n, key))
    rows.sort(key=lambda row: (-abs(row[0]), -abs(row[1])))
    print(f"{'own us/req':>10} {'calls/req':>9}  function ({args.subject} minus {args.against})")
    for delta_us, delta_calls, key in rows[: args.top]:
        print(f"{delta_us:+10.1f} {delta_calls:+9.1f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
