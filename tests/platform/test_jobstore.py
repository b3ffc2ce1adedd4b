"""The render API's job table (letstalk_platform.jobstore) on a real SQLite file and on a real
PostgreSQL server (the database several Ingress replicas on several nodes would share)."""

import itertools

import pytest

from letstalk_platform.jobstore import JobStore

_fresh = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh, empty job table's URL: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    from sqlalchemy import create_engine, text

    server = request.getfixturevalue("postgres_url")
    name = f"jobs_{next(_fresh)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


def state(i: int, status: str = "done", created: float = 100.0, finished: float | None = 200.0) -> dict:
    return {"id": f"{i:032x}", "status": status, "created": created, "finished": finished, "error": None,
            "progress": {"clips_done": 1, "clips_total": 2, "fraction": 0.5, "eta_s": 3.0},
            "video": None, "options": {}, "audio_seconds": 1.0, "rendered_with": None, "seconds": {}}


def test_rows_survive_a_new_connection_page_and_expire(db_url):
    url = db_url
    store = JobStore(url)
    for i in range(5):
        store.save(state(i, created=100.0 + i, finished=200.0 + i) if i != 2 else
                   state(2, "running", created=102.0, finished=None))
    store.save(state(2, created=102.0, finished=202.0) | {"error": "changed"})  # an update, not a second row
    store.close()
    store = JobStore(url)  # what a restarted Ingress sees
    assert store.get(f"{2:032x}")["error"] == "changed" and store.get("f" * 32) is None
    first, total = store.page(limit=2, offset=0)
    rest, _ = store.page(limit=10, offset=2)
    assert total == 5 and [s["id"][-1] for s in first + rest] == ["4", "3", "2", "1", "0"]  # newest first
    assert sorted(store.finished_before(202.5)) == [f"{i:032x}" for i in range(3)]
    store.delete(f"{0:032x}")
    assert store.page(10, 0)[1] == 4


def failed(st: dict) -> dict:
    return st | {"status": "failed", "error": "lost", "finished": 999.0}


def test_only_the_jobs_of_lost_replicas_are_failed(db_url):
    """A job fails when its replica is dead (by name) or silent past the staleness limit, or has no
    owner at all (a row from before owners); a live replica's jobs and finished jobs are kept."""
    import time

    store = JobStore(db_url)
    store.save(state(1, "running", finished=None), owner="alive")
    store.save(state(2, "queued", finished=None), owner="silent")
    store.save(state(3, "running", finished=None), owner="crashed")
    store.save(state(4, "running", finished=None))  # no owner: a row written before heartbeats
    store.save(state(5, "done"), owner="crashed")
    store.save(state(6, "running", finished=None), owner="me")
    assert sorted(store.unfinished_owners()) == ["alive", "crashed", "me", "silent"]
    time.sleep(0.3)
    store.beat("alive", [state(1, "running", finished=None) | {"progress": {"clips_done": 2}}])
    lost = store.fail_orphans(0.2, failed, dead=["crashed"], alive="me")  # "me" is stale too, but it asks
    assert sorted(lost) == [f"{i:032x}" for i in (2, 3, 4)]
    assert [store.get(f"{i:032x}")["status"] for i in range(1, 7)] == [
        "running", "failed", "failed", "failed", "done", "running"]
    assert store.get(f"{1:032x}")["progress"] == {"clips_done": 2}  # the beat wrote the owner's progress
    assert store.fail_orphans(60, failed, alive="me") == []
    time.sleep(0.3)  # "alive" stops beating: past the limit, its job goes too; "me" still never
    assert store.fail_orphans(0.2, failed, alive="me") == [f"{1:032x}"]


def test_a_cancel_asked_elsewhere_reaches_the_owner_beat(db_url):
    store = JobStore(db_url)
    store.save(state(1, "running", finished=None), owner="a")
    store.save(state(2, "running", finished=None), owner="a")
    store.save(state(3, "done"), owner="a")
    assert store.request_cancel(f"{1:032x}") and not store.request_cancel(f"{3:032x}")
    assert not store.request_cancel("f" * 32)
    both = [state(1, "running", finished=None), state(2, "running", finished=None)]
    assert store.beat("a", both) == [f"{1:032x}"]
    assert store.beat("b", both) == [f"{1:032x}"]  # the ids it asked about; another owner's beat writes nothing
    assert store.get(f"{2:032x}")["progress"]["clips_done"] == 1


def test_a_table_from_before_heartbeats_gains_the_columns(tmp_path):
    """An older jobs.db (no owner/heartbeat/cancel columns) opens, keeps its rows and takes new ones."""
    import json
    import sqlite3

    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE render_jobs (id VARCHAR(32) PRIMARY KEY, status VARCHAR(16) NOT NULL, "
                   "created FLOAT NOT NULL, finished FLOAT, state TEXT NOT NULL)")
        db.execute("INSERT INTO render_jobs VALUES (?, 'running', 1.0, NULL, ?)",
                   (f"{1:032x}", json.dumps(state(1, "running", finished=None))))
    store = JobStore(f"sqlite:///{path}")
    assert store.get(f"{1:032x}")["status"] == "running"
    assert store.fail_orphans(60, failed) == [f"{1:032x}"]  # no heartbeat: its replica is long gone
    store.save(state(2, "queued", finished=None), owner="new")
    assert store.unfinished_owners() == ["new"]


def test_a_finished_row_is_final(db_url):
    """A job that another replica failed as lost (its owner looked dead) stays failed: the old owner's
    save of its result, and its beat, write nothing; the save says so (False)."""
    store = JobStore(db_url)
    job = f"{1:032x}"
    store.save(state(1, "running", finished=None), owner="old")
    assert store.fail_orphans(60, failed, dead=["old"]) == [job]
    written = store.save(state(1, "done", finished=300.0), owner="old")
    store.beat("old", [state(1, "done", finished=300.0)])
    row = store.get(job)
    assert (row["status"], row["error"], row["finished"]) == ("failed", "lost", 999.0)
    assert written is False
    assert store.slots_in_use() == 0 and store.finished_before(1000.0) == [job]


def test_replicas_take_slots_from_one_count(db_url):
    """The render slots are the service's: two stores over one table (two engines, as two Ingress
    replicas in two processes have) taking slots at the same moment never get more than the capacity
    between them, and get all of it (1 of 1, then 5 of 5); a slot becomes the job's row when the job is
    saved with it (the count stays), and comes back when the job ends, when it is released, or when
    its replica is gone (dead, or a slot nobody beats)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    stores = [JobStore(db_url), JobStore(db_url)]

    def burst(capacity: int, n: int = 12) -> list[str]:
        gate = threading.Barrier(n)

        def take(i: int) -> str | None:
            gate.wait()  # all leave together
            return stores[i % 2].take_slot(f"replica-{i % 2}", capacity)

        with ThreadPoolExecutor(n) as pool:
            return [slot for slot in pool.map(take, range(n)) if slot is not None]

    for _ in range(3):
        taken = burst(capacity=1)
        assert len(taken) == 1, taken
        stores[1].release_slot(taken[0])  # the other replica's store frees it: one table
    taken = burst(capacity=5)
    assert len(taken) == 5 and stores[0].slots_in_use() == stores[1].slots_in_use() == 5
    for slot in taken:
        stores[0].release_slot(slot)
    slot = stores[0].take_slot("replica-0", 1)
    assert stores[0].save(state(1, "queued", finished=None), owner="replica-0", slot=slot)
    stores[0].release_slot(slot)  # the job holds it now: nothing to give back
    assert stores[1].slots_in_use() == 1 and stores[1].take_slot("replica-1", 1) is None
    assert stores[0].save(state(1, "done"), owner="replica-0")
    assert stores[1].slots_in_use() == 0
    # a dead replica's slot goes back; so does one nobody beats (even the caller's own: a lost release)
    stores[0].take_slot("crashed", 2)
    beaten, lost = stores[0].take_slot("me", 3), stores[0].take_slot("me", 3)
    assert sorted(stores[1].unfinished_owners()) == ["crashed", "me"]
    assert stores[1].fail_orphans(60, failed, dead=["crashed"], alive="me") == []
    assert stores[1].slots_in_use() == 2
    time.sleep(0.3)
    stores[0].beat("me", [], [beaten])
    stores[1].fail_orphans(0.2, failed, alive="me")
    assert stores[1].slots_in_use() == 1 and stores[0].take_slot("me", 2) is not None
    assert lost not in (None, beaten)
