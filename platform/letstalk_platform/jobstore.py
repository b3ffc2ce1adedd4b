"""The render API's job table, in a database: it outlives the Ingress replicas.

SQLite (a file in the serve work dir) by default; any SQLAlchemy URL works (e.g. Postgres for
Ingress replicas on several nodes). A row holds the job's public state as JSON, with the columns
the queries need beside it: status, created, finished, the `owner` (the Ingress replica running
the job) and its `heartbeat`. Each replica beats every few seconds for its unfinished jobs, writing
their progress; an unfinished job whose heartbeat is older than the staleness limit lost its
replica (a crash, a killed node) and is failed by whichever replica notices first, so a replica
that starts never fails the jobs of the replicas still running. A DELETE that reaches a replica
other than the owner sets `cancel` on the row; the owner's next beat cancels the render.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from sqlalchemy import (Boolean, Column, Float, MetaData, String, Table, Text, create_engine, delete, func, inspect,
                        select, text, update)

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
ACTIVE = ("queued", "running")  # the unfinished statuses: the job holds a render slot


class JobStore:
    def __init__(self, url: str):
        args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
        self.url = url
        self.engine = create_engine(url, connect_args=args)
        _meta.create_all(self.engine)
        have = {c["name"] for c in inspect(self.engine).get_columns("render_jobs")}
        with self.engine.begin() as db:  # a table from before owners and heartbeats: add the columns
            for column in ("owner", "heartbeat", "cancel"):
                if column not in have:
                    kind = {"owner": "VARCHAR(255)", "heartbeat": "FLOAT", "cancel": "BOOLEAN NOT NULL DEFAULT FALSE"}
                    db.execute(text(f"ALTER TABLE render_jobs ADD COLUMN {column} {kind[column]}"))

    def save(self, state: dict[str, Any], owner: str | None = None) -> None:
        """Insert or replace one job's row (`state`: RenderJob.public()); `owner`: the replica running it
        (its heartbeat starts now)."""
        row = {"status": state["status"], "created": state["created"], "finished": state["finished"],
               "state": json.dumps(state)}
        if owner is not None:
            row |= {"owner": owner, "heartbeat": time.time()}
        with self.engine.begin() as db:
            done = db.execute(update(JOBS).where(JOBS.c.id == state["id"]).values(**row)).rowcount
            if not done:
                db.execute(JOBS.insert().values(id=state["id"], **row))

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

    def beat(self, owner: str, states: list[dict[str, Any]]) -> list[str]:
        """The owner's sign of life: its unfinished jobs' rows get the progress in `states` and a fresh
        heartbeat. Returns the ids among them that another replica asked to cancel."""
        now = time.time()
        with self.engine.begin() as db:
            for state in states:
                db.execute(update(JOBS).where(JOBS.c.id == state["id"], JOBS.c.owner == owner,
                                              JOBS.c.status.in_(ACTIVE))
                           .values(heartbeat=now, status=state["status"], state=json.dumps(state)))
            ids = [s["id"] for s in states]
            return list(db.execute(select(JOBS.c.id).where(JOBS.c.id.in_(ids), JOBS.c.cancel)).scalars()) if ids else []

    def request_cancel(self, job_id: str) -> bool:
        """Ask the owner to cancel (a DELETE another replica received): False when the job is not unfinished."""
        with self.engine.begin() as db:
            return db.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status.in_(ACTIVE))
                              .values(cancel=True)).rowcount > 0

    def unfinished_owners(self) -> list[str]:
        with self.engine.connect() as db:
            return list(db.execute(select(JOBS.c.owner).distinct().where(JOBS.c.status.in_(ACTIVE),
                                                                         JOBS.c.owner.is_not(None))).scalars())

    def fail_orphans(self, stale_s: float, failed: Callable[[dict[str, Any]], dict[str, Any]],
                     dead: list[str] = (), alive: str | None = None) -> list[str]:
        """Fail the unfinished jobs whose owner's heartbeat is over `stale_s` old or missing (their
        replica died, and their renders with it), and every unfinished job of the `dead` owners; never
        those of `alive` (the caller). `failed(state)` gives a row's state as failed. Returns the ids."""
        lost = JOBS.c.heartbeat.is_(None) | (JOBS.c.heartbeat < time.time() - stale_s)
        if dead:
            lost = lost | JOBS.c.owner.in_(list(dead))
        if alive is not None:
            lost = lost & ((JOBS.c.owner != alive) | JOBS.c.owner.is_(None))
        with self.engine.begin() as db:
            rows = db.execute(select(JOBS.c.id, JOBS.c.state).where(JOBS.c.status.in_(ACTIVE), lost)).all()
            for job_id, state in rows:
                new = failed(json.loads(state))
                # the status check again: the owner may have finished it since the select (another process)
                db.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status.in_(ACTIVE))
                           .values(status=new["status"], finished=new["finished"], state=json.dumps(new)))
        return [r[0] for r in rows]

    def close(self) -> None:
        self.engine.dispose()
