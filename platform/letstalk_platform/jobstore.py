"""The render API's job table, in a database: it outlives the Ingress replica.

SQLite (a file in the serve work dir) by default; any SQLAlchemy URL works (e.g. Postgres for
several Ingress replicas sharing one table). A row holds the job's public state as JSON, with the
columns the queries need (status, created, finished) beside it. Progress is live state: rows are
written when a job is accepted, starts running and finishes, not on every denoising step.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, Text, create_engine, delete, func, select, update

_meta = MetaData()
JOBS = Table(
    "render_jobs", _meta,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False, index=True),
    Column("created", Float, nullable=False, index=True),
    Column("finished", Float, nullable=True, index=True),
    Column("state", Text, nullable=False),  # JSON: the job's public state
)
ACTIVE = ("queued", "running")


class JobStore:
    def __init__(self, url: str):
        args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        self.url = url
        self.engine = create_engine(url, connect_args=args)
        _meta.create_all(self.engine)

    def save(self, state: dict[str, Any]) -> None:
        """Insert or replace one job's row (`state`: RenderJob.public())."""
        row = {"status": state["status"], "created": state["created"], "finished": state["finished"],
               "state": json.dumps(state)}
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

    def fail_unfinished(self, reason: str) -> list[str]:
        """Mark every queued or running job failed with `reason` (their renders died with the replica
        that ran them): the ids marked."""
        now = time.time()
        with self.engine.begin() as db:
            rows = db.execute(select(JOBS.c.id, JOBS.c.state).where(JOBS.c.status.in_(ACTIVE))).all()
            for job_id, state in rows:
                state = json.loads(state) | {"status": "failed", "error": reason, "finished": now, "video": None}
                state["progress"] = state["progress"] | {"eta_s": 0.0}
                db.execute(update(JOBS).where(JOBS.c.id == job_id)
                           .values(status="failed", finished=now, state=json.dumps(state)))
        return [r[0] for r in rows]

    def close(self) -> None:
        self.engine.dispose()
