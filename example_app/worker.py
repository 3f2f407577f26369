"""Batch worker: folds new location points into per-tracker daily summaries.

    python -m example_app.worker [--batch-size 500] [--max-batches N]

Outside a request there are no dependencies and no read-your-writes token, so
the worker picks each side itself with the context managers:

* the scan of new points, the bulk of the reading, runs on a replica
  (``get_read_db_context()``);
* claiming the points and updating the summaries run on the primary, in one
  transaction (``get_write_db_context()``), so a crash leaves neither half;
* the closing report reads back what this run just wrote, which a replica may
  not have replayed yet, so it reads on the primary (``primary=True``).

The same fold also runs as a job right after a request records a point
(``POST /trackers/{id}/locations`` hands it to ``BackgroundTasks``, with
``fastapi_rwdb.current_token()``). Its scan then reads with ``after=token``: a
replica serves it only once it has replayed that request's write, so the job
never misses the very point it was started for. A queue (Celery, arq, RQ) would
carry the token the same way, as a plain string argument; from the command line,
``--after TOKEN``.

A replica may trail the primary: it can still list as new a point that an
earlier run has already claimed. The claim on the primary is therefore
conditional (``UPDATE ... WHERE NOT processed RETURNING id``) and only the
points it returns are counted, so a stale scan, or two workers running at
once, never count a point twice. Points are immutable once recorded, so the
replica's copy of the claimed ones is as good as the primary's.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select

import fastapi_rwdb
from fastapi_rwdb import get_read_db_context, get_write_db_context

from .models import DailySummary, Location, create_tables


@dataclass
class Totals:
    batches: int = 0
    scanned: int = 0
    claimed: int = 0
    summaries: int = 0
    days: set[date] = field(default_factory=set)


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def scan(after_id: int, batch_size: int, token: str | None = None) -> Sequence[Location]:
    """The next batch of new points, by id, from a replica (one that has replayed
    ``token``'s write, when given)."""
    query = (
        select(Location)
        .where(col(Location.id) > after_id, col(Location.processed).is_(False))
        .order_by(col(Location.id))
        .limit(batch_size)
    )
    with get_read_db_context(after=token) as db:
        return db.scalars(query).all()


def fold(points: Sequence[Location]) -> tuple[set[int], int]:
    """Claim ``points`` on the primary and add the claimed ones to the summaries.

    Returns the ids claimed and the number of summary rows touched.
    """
    ids = [p.id for p in points]
    with get_write_db_context() as db:
        claim = (
            update(Location)
            .where(col(Location.id).in_(ids), col(Location.processed).is_(False))
            .values(processed=True)
            .returning(col(Location.id))
        )
        claimed = {i for i in db.scalars(claim) if i is not None}  # ids are never NULL
        groups: dict[tuple[int, date], list[datetime]] = {}
        for p in points:
            if p.id in claimed:
                groups.setdefault((p.tracker_id, utc_day(p.recorded_at)), []).append(p.recorded_at)
        # In key order, so two workers touching the same rows lock them in the same order.
        for (tracker_id, day), seen in sorted(groups.items()):
            row = insert(DailySummary).values(
                tracker_id=tracker_id,
                day=day,
                locations=len(seen),
                first_seen=min(seen),
                last_seen=max(seen),
            )
            db.execute(
                row.on_conflict_do_update(
                    index_elements=[col(DailySummary.tracker_id), col(DailySummary.day)],
                    set_={
                        "locations": col(DailySummary.locations) + row.excluded.locations,
                        "first_seen": func.least(
                            col(DailySummary.first_seen), row.excluded.first_seen
                        ),
                        "last_seen": func.greatest(
                            col(DailySummary.last_seen), row.excluded.last_seen
                        ),
                    },
                )
            )
        # get_write_db_context() commits here, when the block ends without an error.
    return claimed, len(groups)


def report(days: set[date]) -> tuple[int, int]:
    """(trackers, points) summarised for ``days``: this run's own writes, so read on
    the primary; a replica could still be without them."""
    query = select(
        func.count(func.distinct(DailySummary.tracker_id)),
        func.coalesce(func.sum(DailySummary.locations), 0),
    ).where(col(DailySummary.day).in_(sorted(days)))
    with get_read_db_context(primary=True) as db:
        trackers, points = db.execute(query).one()
    return int(trackers), int(points)


def run(batch_size: int = 500, max_batches: int | None = None, token: str | None = None) -> Totals:
    # The app creates the tables at start-up; the worker may well run first.
    with fastapi_rwdb.get_database().engines.write.begin() as conn:
        create_tables(conn)
    return fold_new_points(batch_size, max_batches, token)


def fold_new_points(
    batch_size: int = 500, max_batches: int | None = None, token: str | None = None
) -> Totals:
    """Fold every new point; the job a request starts after recording one."""
    totals = Totals()
    after_id = 0
    while max_batches is None or totals.batches < max_batches:
        points = scan(after_id, batch_size, token)
        if not points:
            break
        after_id = max(p.id for p in points if p.id is not None)
        claimed_ids, summaries = fold(points)
        totals.batches += 1
        totals.scanned += len(points)
        totals.claimed += len(claimed_ids)
        totals.summaries += summaries
        totals.days.update(utc_day(p.recorded_at) for p in points if p.id in claimed_ids)
    return totals


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_app.worker",
        description="Fold new location points into per-tracker daily summaries.",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="points per batch (500)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    parser.add_argument(
        "--after",
        metavar="TOKEN",
        default=None,
        help="a read-your-writes token: scan only where its write has been replayed",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    database = fastapi_rwdb.get_database()
    try:
        totals = run(args.batch_size, args.max_batches, args.after)
        print(
            f"worker: {totals.batches} batch(es), {totals.scanned} new point(s) read from a "
            f"replica, {totals.claimed} claimed and summarised on the primary, "
            f"{totals.summaries} daily summary row(s) updated"
        )
        if totals.days:
            trackers, points = report(totals.days)
            days = ", ".join(d.isoformat() for d in sorted(totals.days))
            print(f"worker: summaries for {days}: {trackers} tracker(s), {points} point(s)")
    finally:
        database.dispose_sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
