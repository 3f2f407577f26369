"""Turns the raw figures (``benchmarks/out/*.json``) into ``results.md`` and PNG plots."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

THROUGHPUT_TARGET = 1.0  # at least as fast as the hand-written pattern
NO_TOKEN_ROUTES = ("sync_read", "async_read", "sync_write", "async_write")
TOKEN_ROUTES = ("sync_read_token", "async_read_token")
#: Issue 14: reads within 3 (psycopg) and 4 (asyncpg) round trips, writes one fewer
#: than with a ping on every checkout (4 and 6).
ROUND_TRIP_TARGETS = {"sync_read": 3, "async_read": 4, "sync_write": 3, "async_write": 5}
NOTES = Path(__file__).with_name("notes.md")
#: Written by hand from ``python -m benchmarks.peers`` runs (issue 22), included as is.
PEERS = Path(__file__).with_name("peers.md")


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def _r(x: float) -> str:
    return f"{x:.3f}"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- plots


def plot_offload(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = data["modes"]
    labels = [m["label"] for m in modes.values()]
    share = [m["replica_share"] * 100 for m in modes.values()]
    stale = [m["counts"].get("stale", 0) for m in modes.values()]
    colours = ["#2a9d8f", "#e9c46a", "#f4a261", "#e76f51"][: len(labels)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = left.bar(labels, share, color=colours)
    left.bar_label(bars, fmt="%.0f %%")
    left.set_ylim(0, 110)
    left.set_ylabel("reads served by a replica (%)")
    left.set_title("Replica offload (higher is better)")
    bars = right.bar(labels, stale, color=colours)
    right.bar_label(bars)
    right.set_ylabel("stale reads (own write not seen)")
    right.set_title("Stale reads (0 is the goal)")
    right.set_ylim(0, max([*stale, 1]) * 1.2)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=9)
    fig.suptitle(
        f"{data['clients']} clients, {data['seconds_per_mode']:.0f} s per mode, "
        f"replicas {data['delay']} behind, {data['write_share'] * 100:.0f} % writes"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_overhead(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = data["one_client"]["routes"]
    labels = [r["label"] for r in one.values()]
    xs = list(range(len(labels)))
    series = [
        ("1 client: fastapi_rwdb / baseline", [r["throughput_ratio"] for r in one.values()]),
        (
            "1 client: A/A control (baseline #2 / baseline)",
            [r["control_ratio"] for r in one.values()],
        ),
    ]
    for level in data["load"]:
        series.append(
            (
                f"{level['concurrency']} in flight: fastapi_rwdb / baseline",
                [level["routes"][k]["throughput_ratio"] for k in one],
            )
        )
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(11.5, 4.8))
    colours = ["#2a9d8f", "#bdbdbd", "#8ab17d", "#e9c46a", "#f4a261", "#264653"]
    lowest = 1.0
    for k, (name, spreads) in enumerate(series):
        med = [s["median"] for s in spreads]
        lo = [m - s["p25"] for m, s in zip(med, spreads, strict=True)]
        hi = [s["p75"] - m for m, s in zip(med, spreads, strict=True)]
        lowest = min(lowest, *(s["p25"] for s in spreads))
        ax.bar(
            [x + (k - (len(series) - 1) / 2) * width for x in xs],
            med,
            width,
            yerr=[lo, hi],
            capsize=3,
            label=name,
            color=colours[k],
        )
    ax.axhline(
        THROUGHPUT_TARGET,
        color="#e76f51",
        linestyle="--",
        linewidth=1,
        label=f"target {THROUGHPUT_TARGET:g}",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(xs, labels, fontsize=9)
    highest = max(s["p75"] for _, spreads in series for s in spreads)
    ax.set_ylim(min(0.6, lowest - 0.05), max(1.15, highest + 0.05))
    ax.set_ylabel("throughput relative to the baseline")
    ax.set_title("Overhead against the hand-written pattern (medians; bars = interquartile range)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------ markdown


def _environment(env: dict[str, Any]) -> list[str]:
    v = env["versions"]
    return [
        "## Machine and software",
        "",
        "| | |",
        "| --- | --- |",
        f"| date | {env['date']} |",
        f"| machine | {env['nproc']} cores ({env['cpu']}), {env['memory']} memory, "
        f"Linux {env['kernel']} |",
        f"| fastapi_rwdb | git {env['git']} |",
        f"| Python | {v['python']} |",
        f"| FastAPI / Starlette | {v['fastapi']} / {v['starlette']} |",
        f"| SQLAlchemy | {v['sqlalchemy']} |",
        f"| psycopg / asyncpg | {v['psycopg']} / {v['asyncpg']} |",
        f"| httpx (offload clients) | {v['httpx']} |",
        f"| PostgreSQL | {v['postgresql']} (Patroni, 1 primary + 2 streaming replicas) |",
        f"| PgBouncer | {v['pgbouncer']} (transaction mode, one per node) |",
        f"| HAProxy | {v['haproxy']} (write port 5432, read port 5433, round robin) |",
        "",
        "Everything runs on this one machine: the stack (etcd, 3 x Patroni/PostgreSQL, "
        "3 x PgBouncer, HAProxy) and the benchmark process share its cores, and other "
        "engineers' test runs may share them too. Every comparison is therefore made "
        "inside one run, variants alternating, and reported as ratios with their spread.",
        "",
    ]


def _offload(data: dict[str, Any], png: str) -> list[str]:
    modes = data["modes"]
    seen = data["replica_delay_seen"]
    lines = [
        "## 1. Read-your-writes under replica delay (offload)",
        "",
        f"{data['clients']} simulated clients (one httpx client and cookie jar each, half on "
        f"the sync routes, half on the async ones) run the same seeded script (seed "
        f"{data['seed']}) for {data['seconds_per_mode']:.0f} s per mode, in process "
        f"(`httpx.ASGITransport`), against the real stack with the replicas "
        f"{data['delay']} behind (`scripts/stack.sh lag {data['delay']}`; a replica reported "
        f"`recovery_min_apply_delay` = {seen['during']} during the run, {seen['after']} "
        f"after it). Each step: {data['write_share'] * 100:.0f} % writes; right after a "
        f"write, {data['read_just_written'] * 100:.0f} % of the time a read of the row "
        "just written; other reads fetch one of the client's older rows or the list of its "
        f"latest rows; {data['think_ms'][0]:.0f}-{data['think_ms'][1]:.0f} ms of think time "
        "between requests. A read of the client's own row that finds nothing, or a list "
        "without the client's latest row, is a **stale read**. Who served each read comes "
        "from the `X-RWDB-Read` header (`routing_header=True`).",
        "",
        *_mode_table(modes.values(), set_cookie=False),
        "",
        f"![offload]({png})",
        "",
    ]
    if "unequal" in data:
        lines += _unequal(data)
    return lines


def _unequal(data: dict[str, Any]) -> list[str]:
    unequal = data["unequal"]
    lines = [
        "### Replicas at different positions",
        "",
        f"The same script and seed, {data['seconds_per_mode']:.0f} s per mode, with no apply "
        f"delay but {unequal['paused']}'s WAL replay paused (`scripts/stack.sh pause-replay "
        f"{unequal['paused']}`) while the other replica stays current. The read pools hold "
        "connections to both, so a token cleared because one replica had the write would let "
        "the next read reach the other.",
        "",
        *_mode_table(unequal["modes"].values(), set_cookie=True),
        "",
    ]
    return lines


def _mode_table(modes: Iterable[dict[str, Any]], *, set_cookie: bool) -> list[str]:
    """One row per pinning mode of an offload run."""
    extra = " reads answered with Set-Cookie |" if set_cookie else ""
    lines = [
        "| mode | requests | writes | reads | served by a replica | stale reads | "
        f"stale: just written / older / list |{extra} primary reads by reason |",
        f"| --- | ---: | ---: | ---: | ---: | ---: | --- |{' ---: |' if set_cookie else ''} --- |",
    ]
    for m in modes:
        c = m["counts"]
        reasons = ", ".join(
            f"{k.split('reason=')[1]} {n}"
            for k, n in sorted(c.items())
            if k.startswith("served: primary")
        )
        cookie = f" {c.get('reads_setting_cookie', 0)} |" if set_cookie else ""
        lines.append(
            f"| {m['label']} | {m['requests']} | {c.get('writes', 0)} | {c.get('reads', 0)} | "
            f"{_pct(m['replica_share'])} | {c.get('stale', 0)} | "
            f"{c.get('stale_just_written', 0)} / {c.get('stale_older', 0)} / "
            f"{c.get('stale_list', 0)} |{cookie} {reasons or '-'} |"
        )
    return lines


def _overhead(data: dict[str, Any], png: str) -> list[str]:
    one, wire = data["one_client"], data["wire"]
    levels = data["load"]
    t = levels[0]
    in_flight = ", ".join(str(level["concurrency"]) for level in levels)
    cleared = sum(one["routes"][k]["cleared"] for k in TOKEN_ROUTES)
    total = sum(one["routes"][k]["rwdb"]["requests"] for k in TOKEN_ROUTES)
    lines = [
        "## 2. Overhead against the hand-written pattern",
        "",
        "**Baseline**: the pattern of the implementation guide, as a team writes it today: "
        "two `create_engine` and two `create_async_engine` calls with the same "
        "PgBouncer-safe connect arguments (`prepare_threshold=None`; "
        "`statement_cache_size=0`, `prepared_statement_cache_size=0`) and the same pools "
        "(5 + 10 on the write side, twice that on the read side, pre-ping on), "
        "`sessionmaker`s, plain `Depends` generator functions, no middleware. It leaves out "
        "the guide's `SELECT 1` on every new session (which would cost the baseline a "
        "round trip per request and flatter fastapi_rwdb). **fastapi_rwdb**: "
        "`fastapi_rwdb.setup(app, Database(settings))` (default settings, "
        "`RWDB_PIN_MODE=lsn`; SQLAlchemy's session classes, like the baseline; "
        "`prometheus_client` is installed, so it also counts every routing decision and "
        "token) and its "
        "`ReadSession`/`WriteSession`/`AsyncReadSession`/`AsyncWriteSession`. The route "
        "bodies are the same function for both (`benchmarks/apps.py`): a `SELECT` by "
        "primary key, or an `INSERT ... RETURNING` (SQLAlchemy Core) and `commit()`. The "
        "token routes send a valid `X-RWDB-Pin` token from an earlier write that the "
        "replicas already have, so every such read pays the LSN check and is served by a "
        f"replica (fastapi_rwdb cleared the token in {cleared} of {total} such responses "
        "of the one-client run; the baseline ignores the header).",
        "",
        "**Driver: in process.** A bare ASGI call (`benchmarks/common.py: call`): no "
        "sockets, no HTTP parser, no client library. On 2 cores a real server (uvicorn) "
        "and a load generator (wrk) would take a core between them away from the stack "
        "being measured, their noise would swamp a few per cent, and their own costs, the "
        "same for both apps, would only dilute the difference; the bare call measures the "
        "apps alone, so it is also the stricter test. Two measurements:",
        "",
        f"- **One client, requests interleaved** (the figures the targets are checked "
        f"against): one request in flight; three apps take turns request by request (who "
        f"goes first rotates): the baseline, fastapi_rwdb, and a second, independent "
        f"baseline (own engines and pools) as an **A/A control**, whose ratio to the "
        f"baseline shows this harness's noise floor. {one['seconds_per_route']:.0f} s per "
        f"route. Ratios are taken per block of {one['block']} turns; the table gives the "
        "median over blocks and the interquartile range. Throughput is requests per "
        "second of busy time (1 / mean latency). With one request in flight the process "
        "does nothing else, so its CPU time during a request (`time.process_time`, all "
        "threads) is that request's own.",
        f"- **{in_flight} in flight**, bursts: each round runs every route on the three "
        f"apps (baseline, fastapi_rwdb, A/A control) for {t['seconds_per_burst']} s each, "
        f"back to back, who goes first rotating; {t['rounds']} rounds per level; a round's "
        "ratio compares the bursts of that round. 4 in flight stays below the write pool's "
        "5 core connections; 8 needs overflow connections; 32 is about what a worker's 40 "
        "sync threads hold under load, more than the write pool's 15 connections, so "
        "requests also wait for a connection. Each app uses its default pools. "
        "`connections / 1000 req` counts the connections its pools opened during the "
        "measured bursts (TCP, then SCRAM through HAProxy and PgBouncer): pool churn. "
        "This is the app under load (sync routes in the thread pool, the GIL shared), and "
        "noisier.",
        "",
        "### One client",
        "",
        "| route | baseline req/s | rwdb req/s | **throughput ratio** (IQR) | A/A control "
        "(IQR) | p50 ratio | p99 ratio | CPU/request ratio (IQR) | baseline CPU us | "
        "round trips |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for key, r in one["routes"].items():
        tr, aa, cpu = r["throughput_ratio"], r["control_ratio"], r["cpu_ratio"]
        w = wire["routes"][key]
        lines.append(
            f"| {r['label']} | {r['baseline']['rps']:.0f} | {r['rwdb']['rps']:.0f} | "
            f"**{_r(tr['median'])}** ({_r(tr['p25'])}-{_r(tr['p75'])}) | "
            f"{_r(aa['median'])} ({_r(aa['p25'])}-{_r(aa['p75'])}) | {_r(r['p50_ratio'])} | "
            f"{_r(r['p99_ratio'])} | {_r(cpu['median'])} ({_r(cpu['p25'])}-{_r(cpu['p75'])}) "
            f"| {r['baseline']['cpu_us']:.0f} | {w['baseline']['round_trips']:g} -> "
            f"{w['rwdb']['round_trips']:g} |"
        )
    lines += [
        "",
        "Throughput ratio: fastapi_rwdb / baseline (above 1 is faster). Latency and CPU "
        "ratios: fastapi_rwdb / baseline (above 1 is slower).",
        "",
        *_by_mode(data.get("by_mode")),
    ]
    for level in levels:
        lines += _load_table(level)
    lines += [
        "Here p50/p99 come from all requests of all rounds pooled, and CPU per request is "
        "a burst's process CPU time over its requests.",
        "",
        f"![overhead]({png})",
        "",
        "### Round trips and statements per request",
        "",
        "Counted on the wire: for this count both apps connect through a small proxy "
        "(`benchmarks/wire.py`) that reads the PostgreSQL protocol the client sends. Every "
        "simple `Query`, every `Sync` and every `Flush` (asyncpg describes each statement "
        "before binding it) waits for the server, so their sum is the number of round "
        "trips; it includes what SQLAlchemy events do not see (the pool's pre-ping, "
        "psycopg's `BEGIN`, the rollback on return, statements sent straight on the "
        "driver connection). `statements` is what the server is asked to run: one per "
        "`Parse`, and one per non-empty `;`-separated part of a simple `Query` "
        "(psycopg's ping, an empty query, is none). "
        f"{wire['requests_per_route']} requests per route, sequential, pools warm.",
        "",
        "| route | baseline round trips | rwdb round trips | extra | baseline statements | "
        "rwdb statements | connections opened | rwdb reads served by |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in wire["routes"].values():
        b, w = r["baseline"], r["rwdb"]
        routed = ", ".join(f"{k} {v}" for k, v in w["routed"].items() if k != "-") or "-"
        lines.append(
            f"| {r['label']} | {b['round_trips']:g} | {w['round_trips']:g} | "
            f"{w['round_trips'] - b['round_trips']:+g} | {b['statements']:g} | "
            f"{w['statements']:g} | {b['connects'] + w['connects']:g} | {routed} |"
        )
    lines += [
        "",
        "Where the round trips go: the baseline's psycopg read is pre-ping (an empty "
        "query), `BEGIN`, `SELECT`, `ROLLBACK` (4). Its asyncpg read is SQLAlchemy's "
        "pre-ping (`BEGIN`, `SELECT 1` described then run, `ROLLBACK`: 4), `BEGIN`, the "
        "`SELECT` (described, then run: 2), `ROLLBACK`: 8. fastapi_rwdb skips the "
        "checkout ping for a connection returned less than `RWDB_PING_SKIP_MS` (500 ms) "
        "ago whose socket is quiet, as here (sequential requests): `BEGIN`, `SELECT`, "
        "`ROLLBACK` (3; asyncpg 4). A read with a token always pings, with one "
        "statement that reads the replica's replay position (psycopg 4, asyncpg 5). "
        "A write adds the primary's WAL position after the commit: a statement in the "
        "COMMIT's own message on psycopg (3 round trips), one round trip after it on "
        "asyncpg, a `COPY` of the one value, which needs no describe step (5). Before a "
        "commit after textual SQL it asks whether the transaction wrote (in the "
        "COMMIT's message on psycopg). The replica view's periodic query is kept out "
        "of this count (`RWDB_LAG_CHECK_INTERVAL` set to an hour for it).",
        "",
    ]
    return lines


def _load_table(level: dict[str, Any]) -> list[str]:
    lines = [
        f"### {level['concurrency']} requests in flight",
        "",
        "| route | baseline req/s | rwdb req/s | **throughput ratio** (IQR) | A/A control "
        "(IQR) | p50 ratio | p99 ratio | CPU/request ratio (IQR) | connections / 1000 req: "
        "baseline, rwdb, control | errors |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- | ---: |",
    ]
    for r in level["routes"].values():
        tr, aa, cpu = r["throughput_ratio"], r["control_ratio"], r["cpu_ratio"]
        churn = ", ".join(
            f"{r[name]['connects_per_1000']:.1f}" for name in ("baseline", "rwdb", "control")
        )
        errors = sum(r[name]["errors"] for name in ("baseline", "rwdb", "control"))
        lines.append(
            f"| {r['label']} | {r['baseline']['rps']['median']:.0f} | "
            f"{r['rwdb']['rps']['median']:.0f} | **{_r(tr['median'])}** "
            f"({_r(tr['p25'])}-{_r(tr['p75'])}) | {_r(aa['median'])} "
            f"({_r(aa['p25'])}-{_r(aa['p75'])}) | {_r(r['p50_ratio'])} | {_r(r['p99_ratio'])} | "
            f"{_r(cpu['median'])} ({_r(cpu['p25'])}-{_r(cpu['p75'])}) | {churn} | {errors} |"
        )
    return [*lines, ""]


def _by_mode(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    modes = data["modes"]
    has_control = "control" in next(iter(data["routes"].values()))["ratios"]
    lines = [
        "### What a write pays for read-your-writes",
        "",
        "The write routes once more, interleaved the same way (one client, "
        f"{data['seconds_per_route']:.0f} s per route), with fastapi_rwdb in each pinning "
        "mode next to the baseline. `off`: the package without read-your-writes (split, "
        "sessions, middleware, write tracking). `window`: plus the token, signed and set "
        "as cookie and header, without a WAL position. `lsn` (the default): plus the "
        "primary's WAL position read after the COMMIT: one statement more, sent in the "
        "COMMIT's own message on psycopg and in one round trip more on asyncpg. The "
        "difference between `window` and `lsn` is that statement's cost on the server.",
        "",
        "| route | "
        + " | ".join(f"`{m}`: throughput ratio (IQR)" for m in modes)
        + " | `lsn`: CPU/request ratio |"
        + (" A/A control (IQR) |" if has_control else ""),
        "| --- | "
        + " | ".join("---" for _ in modes)
        + " | ---: |"
        + (" --- |" if has_control else ""),
    ]
    for r in data["routes"].values():
        cells = []
        for m in modes:
            tr = r["ratios"][m]["throughput"]
            cells.append(f"{_r(tr['median'])} ({_r(tr['p25'])}-{_r(tr['p75'])})")
        lsn_cpu = r["ratios"]["lsn"]["cpu"]["median"] if "lsn" in modes else float("nan")
        aa = ""
        if has_control:
            c = r["ratios"]["control"]["throughput"]
            aa = f" {_r(c['median'])} ({_r(c['p25'])}-{_r(c['p75'])}) |"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_r(lsn_cpu)} |" + aa)
    raw = data.get("raw_commit_ms")
    if raw:
        plain, lsn = raw["commit"]["median"], raw["commit_lsn"]["median"]
        lines += [
            "",
            "The statement alone, with psycopg and nothing else (no SQLAlchemy, no package "
            "code), through HAProxy and PgBouncer: an `INSERT` and its `COMMIT` take "
            f"{plain:.2f} ms; with `SELECT pg_current_wal_lsn()` in the COMMIT's message, "
            f"{lsn:.2f} ms (+{(lsn - plain) * 1e3:.0f} us, {lsn / plain - 1:+.1%}; medians "
            f"of {raw['commit']['n']} alternating rounds).",
        ]
    return [*lines, ""]


def _micro(data: dict[str, Any]) -> list[str]:
    lines = [
        "## 3. The middleware's own cost (no database)",
        "",
        f"In process, {data['requests_per_round']} sequential calls per variant per round, "
        f"{data['rounds']} rounds, the variants' order reversed every other round. Cost is "
        "the variant's time per request minus its baseline's in the same round (median "
        f"over rounds). The token is a valid one ({data['token_length']} characters), so it "
        "is parsed and its signature checked; the cookie header also carries two other "
        "cookies. The trivial FastAPI route shows the cost against the smallest real "
        "request.",
        "",
        "| variant | us / request (IQR) | cost over baseline, us (IQR) | ratio |",
        "| --- | --- | --- | ---: |",
    ]
    for row in data["rows"]:
        us, cost = row["us_per_request"], row["cost_us"]
        lines.append(
            f"| {row['variant']} | {us['median']:.1f} ({us['p25']:.1f}-{us['p75']:.1f}) | "
            f"{cost['median']:+.1f} ({cost['p25']:+.1f}-{cost['p75']:+.1f}) | "
            f"{row['ratio']:.2f} |"
        )
    lines.append("")
    return lines


def _summary(
    offload: dict[str, Any] | None, overhead: dict[str, Any] | None, micro: dict[str, Any] | None
) -> list[str]:
    lines = ["## Targets", "", "| target | figure | |", "| --- | --- | --- |"]
    if offload:
        m = offload["modes"]
        lsn = m["lsn"]
        stale = lsn["counts"].get("stale", 0)
        lines.append(f"| LSN mode: no stale reads | {stale} stale | {_ok(stale == 0)} |")
        windows = [m[k] for k in ("window_2s", "window_15s") if k in m]
        better = all(lsn["replica_share"] > w["replica_share"] for w in windows)
        shares = ", ".join(f"{w['label']} {_pct(w['replica_share'])}" for w in windows)
        lines.append(
            f"| LSN mode: more replica reads than both windows | LSN "
            f"{_pct(lsn['replica_share'])}; {shares} | {_ok(better)} |"
        )
        if "off" in m:
            off = m["off"]["counts"].get("stale", 0)
            lines.append(
                f"| no pinning shows stale reads (the lag is real) | {off} stale | {_ok(off > 0)} |"
            )
        unequal = (offload.get("unequal") or {}).get("modes", {})
        for key in ("lsn", "session"):
            if key in unequal:
                u = unequal[key]
                stale = u["counts"].get("stale", 0)
                lines.append(
                    f"| {u['label']}, one replica paused: no stale reads | {stale} stale, "
                    f"{_pct(u['replica_share'])} of reads on a replica | {_ok(stale == 0)} |"
                )
    if overhead:
        one, levels = overhead["one_client"]["routes"], overhead["load"]
        by_mode = (overhead.get("by_mode") or {}).get("routes", {})
        for key in NO_TOKEN_ROUTES:
            r, tr = one[key], one[key]["throughput_ratio"]
            all_levels = [tr["median"]] + [
                level["routes"][key]["throughput_ratio"]["median"] for level in levels
            ]
            under = "; ".join(
                f"{level['concurrency']} in flight: "
                f"{_r(level['routes'][key]['throughput_ratio']['median'])} "
                f"(A/A {_r(level['routes'][key]['control_ratio']['median'])})"
                for level in levels
            )
            modes = ""
            if key in by_mode:
                ratios = by_mode[key]["ratios"]
                modes = "; " + ", ".join(
                    f"`{m}` {_r(ratios[m]['throughput']['median'])}"
                    for m in ("off", "window")
                    if m in ratios
                )
            lines.append(
                f"| throughput ratio >= {THROUGHPUT_TARGET}: {r['label']} | {_r(tr['median'])} "
                f"(IQR {_r(tr['p25'])}-{_r(tr['p75'])}; A/A control "
                f"{_r(r['control_ratio']['median'])}); "
                f"{under}{modes} "
                f"| {_ok(min(all_levels) >= THROUGHPUT_TARGET)} |"
            )
        wire = overhead["wire"]["routes"]
        for key, most in ROUND_TRIP_TARGETS.items():
            w = wire[key]
            n = w["rwdb"]["round_trips"]
            lines.append(
                f"| round trips: {w['label']} at most {most:g} | {n:g} (hand-written "
                f"{w['baseline']['round_trips']:g}) | {_ok(n <= most)} |"
            )
        for key in TOKEN_ROUTES:
            w = wire[key]
            plain = wire[key.removesuffix("_token")]["rwdb"]["round_trips"]
            extra = w["rwdb"]["round_trips"] - plain
            lines.append(
                f"| a read with a token: at most one round trip more than without: "
                f"{w['label']} | {extra:+g} ({plain:g} -> {w['rwdb']['round_trips']:g}) | "
                f"{_ok(extra <= 1)} |"
            )
        for level in levels:
            if level["concurrency"] < 8:
                continue
            churn = max(r["rwdb"]["connects_per_1000"] for r in level["routes"].values())
            worst = max(r["baseline"]["connects_per_1000"] for r in level["routes"].values())
            lines.append(
                f"| no pool churn at {level['concurrency']} in flight (connections opened "
                f"per 1000 requests, worst route) | {churn:.1f} (hand-written {worst:.1f}) "
                f"| {_ok(churn < 1)} |"
            )
    if micro:
        row = next(r for r in micro["rows"] if r["variant"] == "+ middleware, no token")
        tok = next(r for r in micro["rows"] if r["variant"] == "+ middleware, token in header")
        bare, with_token = row["cost_us"]["median"], tok["cost_us"]["median"]
        lines.append(
            f"| middleware cost per request without a token under 3 us | {bare:.1f} us | "
            f"{_ok(bare < 3)} |"
        )
        lines.append(
            f"| middleware cost per request with a token under 8 us | {with_token:.1f} us | "
            f"{_ok(with_token < 8)} |"
        )
    lines.append("")
    if NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    return lines


def write_report(
    path: Path,
    env: dict[str, Any],
    offload: dict[str, Any] | None,
    overhead: dict[str, Any] | None,
    micro: dict[str, Any] | None,
    command: str,
    notes: list[str],
) -> list[Path]:
    written = [path]
    base = path.parent
    lines = [
        "# fastapi_rwdb benchmarks",
        "",
        f"Generated by `{command}` (see `benchmarks/__init__.py`); do not edit by hand. "
        f"Raw figures: `benchmarks/out/*.json`.",
        "",
        *_summary(offload, overhead, micro),
        *_environment(env),
    ]
    if offload:
        png = path.with_name(path.stem.replace("results", "offload") + ".png")
        if png == path.with_suffix(".png"):
            png = path.with_name("offload.png")
        plot_offload(offload, png)
        written.append(png)
        lines += _offload(offload, _rel(png, base))
    if overhead:
        png = path.with_name(path.stem.replace("results", "overhead") + ".png")
        if png == path.with_suffix(".png"):
            png = path.with_name("overhead.png")
        plot_overhead(overhead, png)
        written.append(png)
        lines += _overhead(overhead, _rel(png, base))
    if micro:
        lines += _micro(micro)
    if PEERS.exists():
        lines += [PEERS.read_text().strip(), ""]
    if notes:
        lines += ["## Run notes", "", *[f"- {n}" for n in notes], ""]
    path.write_text("\n".join(lines))
    return written
