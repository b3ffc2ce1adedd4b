"""The render API's job table, in a database: it outlives the Ingress replicas.

SQLite (a file in the serve work dir) by default, or PostgreSQL (any SQLAlchemy URL of it: for
Ingress replicas on several nodes); other databases are refused, as admission locks in ways
particular to each (`_alone`). A row holds the job's public state as JSON, with the columns
the queries need beside it: status, created, finished, the `owner` (the Ingress replica running
the job) and its `heartbeat`. Each replica beats every few seconds for its unfinished jobs, writing
their progress; an unfinished job whose heartbeat is older than the staleness limit lost its
replica (a crash, a killed node) and is failed by whichever replica notices first, so a replica
that starts never fails the jobs of the replicas still running. A DELETE that reaches a replica
other than the owner sets `cancel` on the row; the owner's next beat cancels the render. A finished
row is final: no later save or beat changes its status (an owner that comes back after another
replica failed its job as lost cannot turn it into `done`).

The render slots are the service's, counted here for all replicas at once: unfinished jobs plus
the `render_slots` rows, each a slot taken by a request still uploading and decoding (not a job
yet). `take_slot` counts and takes in one transaction that runs alone (SQLite: BEGIN IMMEDIATE, the
database's write lock; PostgreSQL: a transaction-scoped advisory lock), so replicas admitting at the
same moment cannot both take the last slot; the new job's row replaces its slot row in one
transaction, so the count never drops in between.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from sqlalchemy import (Boolean, Column, Float, MetaData, String, Table, Text, create_engine, delete, func, inspect,
                        select, text, true, update)

_meta = MetaData()
JOBS = Table(
    "render_jobs", _meta,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False, index=True),
    Column("created", Float, nullable=False, index=True),
    Column("finished", Float, nullable=True, index=True),
    Column("state", Text, nullable=False),  # JSON: the job's public state
    Column("owner", String(255), nullable=True),  # the Ingress replica that runs it
    Column("heartbeat", Float, nullable=True),  # the owner's last sign of life (unfinished jobs)
    Column("cancel", Boolean, nullable=False, default=False),  # a DELETE seen by another replica
)
SLOTS = Table(  # slots taken by requests that are not jobs yet (uploading, decoding)
    "render_slots", _meta,
    Column("id", String(32), primary_key=True),
    Column("owner", String(255), nullable=False),  # the Ingress replica serving the request
    Column("heartbeat", Float, nullable=False),  # refreshed by the owner's beat, as its jobs' rows
)
ACTIVE = ("queued", "running")  # the unfinished statuses: the job holds a render slot
ADMISSION_LOCK = 0x4C54_524E  # PostgreSQL advisory lock key of take_slot ("LTRN")


class JobStore:
    def __init__(self, url: str):
        args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
        self.url = url
        self.engine = create_engine(url, connect_args=args)
        if self.engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"the job table needs SQLite or PostgreSQL (admission locks the table), not "
                             f"{self.engine.dialect.name}")
        _meta.create_all(self.engine)
        have = {c["name"] for c in inspect(self.engine).get_columns("render_jobs")}
        with self.engine.begin() as db:  # a table from before owners and heartbeats: add the columns
            for column in ("owner", "heartbeat", "cancel"):
                if column not in have:
                    kind = {"owner": "VARCHAR(255)", "heartbeat": "FLOAT", "cancel": "BOOLEAN NOT NULL DEFAULT FALSE"}
                    db.execute(text(f"ALTER TABLE render_jobs ADD COLUMN {column} {kind[column]}"))

    @contextmanager
    def _alone(self) -> Iterator[Any]:
        """A transaction no other `_alone` transaction overlaps, in any process."""
        if self.engine.dialect.name == "sqlite":
            # the driver's own transaction handling off (AUTOCOMMIT), so that BEGIN IMMEDIATE is ours:
            # it takes the write lock at once, where a plain BEGIN would let two counts run side by side
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
                db.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.exec_driver_sql("ROLLBACK")
                    raise
                db.exec_driver_sql("COMMIT")
        else:  # READ COMMITTED: the count, run after the lock, sees what the previous holder committed
            with self.engine.begin() as db:
                db.execute(select(func.pg_advisory_xact_lock(ADMISSION_LOCK)))
                yield db

    def take_slot(self, owner: str, capacity: int) -> str | None:
        """One of the service's `capacity` render slots for a request of `owner` (an Ingress replica),
        or None when all are in use. The slot is held until the job saved with it (`save(..., slot=)`)
        ends, or until `release_slot`."""
        with self._alone() as db:
            if self._in_use(db) >= capacity:
                return None
            slot = uuid.uuid4().hex
            db.execute(SLOTS.insert().values(id=slot, owner=owner, heartbeat=time.time()))
            return slot

    def release_slot(self, slot: str) -> None:
        """Give back a slot that did not become a job (a refused or failed request); once the job's row
        holds it, nothing is left to release."""
        with self.engine.begin() as db:
            db.execute(delete(SLOTS).where(SLOTS.c.id == slot))

    def slots_in_use(self) -> int:
        with self.engine.connect() as db:
            return self._in_use(db)

    @staticmethod
    def _in_use(db) -> int:
        """Unfinished jobs and slots taken by requests, in one statement (one snapshot)."""
        jobs = select(func.count()).select_from(JOBS).where(JOBS.c.status.in_(ACTIVE)).scalar_subquery()
        slots = select(func.count()).select_from(SLOTS).scalar_subquery()
        return db.execute(select(jobs + slots)).scalar_one()

    def save(self, state: dict[str, Any], owner: str | None = None, slot: str | None = None) -> bool:
        """Insert or update one job's row (`state`: RenderJob.public()); `owner`: the replica running it
        (its heartbeat starts now); `slot`: the slot its request took, which the new row holds from now
        on. A finished row is final: False, and nothing written, when the row is finished already
        (another replica failed the job as lost)."""
        row = {"status": state["status"], "created": state["created"], "finished": state["finished"],
               "state": json.dumps(state)}
        if owner is not None:
            row |= {"owner": owner, "heartbeat": time.time()}
        with self.engine.begin() as db:
            if db.execute(update(JOBS).where(JOBS.c.id == state["id"], JOBS.c.status.in_(ACTIVE))
                          .values(**row)).rowcount:
                return True
            if db.execute(select(JOBS.c.id).where(JOBS.c.id == state["id"])).first() is not None:
                return False
            db.execute(JOBS.insert().values(id=state["id"], **row))
            if slot is not None:
                db.execute(delete(SLOTS).where(SLOTS.c.id == slot))
            return True

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            state = db.execute(select(JOBS.c.state).where(JOBS.c.id == job_id)).scalar()
        return None if state is None else json.loads(state)

    def page(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Newest first: (states, total)."""
        with self.engine.connect() as db:
            total = db.execute(select(func.count()).select_from(JOBS)).scalar_one()
            rows = db.execute(select(JOBS.c.state).order_by(JOBS.c.created.desc(), JOBS.c.id)
                              .limit(limit).offset(offset)).scalars()
            return [json.loads(s) for s in rows], total

    def delete(self, job_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(delete(JOBS).where(JOBS.c.id == job_id))

    def finished_before(self, when: float) -> list[str]:
        with self.engine.connect() as db:
            return list(db.execute(select(JOBS.c.id).where(JOBS.c.finished.is_not(None), JOBS.c.finished < when))
                        .scalars())

    def beat(self, owner: str, states: list[dict[str, Any]], slots: list[str] = ()) -> list[str]:
        """The owner's sign of life: its unfinished jobs' rows get the state in `states` (the progress,
        or the end a failed save did not write) and a fresh heartbeat, and so do the `slots` its requests
        hold. Returns the ids among the jobs that another replica asked to cancel."""
        now = time.time()
        with self.engine.begin() as db:
            for state in states:
                db.execute(update(JOBS).where(JOBS.c.id == state["id"], JOBS.c.owner == owner,
                                              JOBS.c.status.in_(ACTIVE))
                           .values(heartbeat=now, status=state["status"], finished=state["finished"],
                                   state=json.dumps(state)))
            if slots:
                db.execute(update(SLOTS).where(SLOTS.c.id.in_(list(slots))).values(heartbeat=now))
            ids = [s["id"] for s in states]
            return list(db.execute(select(JOBS.c.id).where(JOBS.c.id.in_(ids), JOBS.c.cancel)).scalars()) if ids else []

    def request_cancel(self, job_id: str) -> bool:
        """Ask the owner to cancel (a DELETE another replica received): False when the job is not unfinished."""
        with self.engine.begin() as db:
            return db.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status.in_(ACTIVE))
                              .values(cancel=True)).rowcount > 0

    def unfinished_owners(self) -> list[str]:
        """The replicas that run unfinished jobs or hold slots."""
        with self.engine.connect() as db:
            jobs = select(JOBS.c.owner).where(JOBS.c.status.in_(ACTIVE), JOBS.c.owner.is_not(None))
            return sorted(set(db.execute(jobs.union(select(SLOTS.c.owner))).scalars()))

    def fail_orphans(self, stale_s: float, failed: Callable[[dict[str, Any]], dict[str, Any]],
                     dead: list[str] = (), alive: str | None = None) -> list[str]:
        """Fail the unfinished jobs whose owner's heartbeat is over `stale_s` old or missing (their
        replica died, and their renders with it), and every unfinished job of the `dead` owners; never
        those of `alive` (the caller). `failed(state)` gives a row's state as failed. Slots go back on
        the same terms, `alive`'s stale ones too: a live owner beats every slot it still holds, so a
        stale one is a slot it failed to give back. Returns the ids of the failed jobs."""
        def lost(table: Table):
            gone = table.c.heartbeat.is_(None) | (table.c.heartbeat < time.time() - stale_s)
            return gone | table.c.owner.in_(list(dead)) if dead else gone

        spared = JOBS.c.owner.is_(None) | (JOBS.c.owner != alive) if alive is not None else true()
        with self.engine.begin() as db:
            db.execute(delete(SLOTS).where(lost(SLOTS)))
            rows = db.execute(select(JOBS.c.id, JOBS.c.state).where(JOBS.c.status.in_(ACTIVE), lost(JOBS),
                                                                    spared)).all()
            for job_id, state in rows:
                new = failed(json.loads(state))
                # the status check again: the owner may have finished it since the select (another process)
                db.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status.in_(ACTIVE))
                           .values(status=new["status"], finished=new["finished"], state=json.dumps(new)))
        return [r[0] for r in rows]

    def close(self) -> None:
        self.engine.dispose()
