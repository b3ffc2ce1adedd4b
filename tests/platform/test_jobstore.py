"""The render API's job table (letstalk_platform.jobstore) on a real SQLite file."""

from letstalk_platform.jobstore import JobStore


def state(i: int, status: str = "done", created: float = 100.0, finished: float | None = 200.0) -> dict:
    return {"id": f"{i:032x}", "status": status, "created": created, "finished": finished, "error": None,
            "progress": {"clips_done": 1, "clips_total": 2, "fraction": 0.5, "eta_s": 3.0},
            "video": None, "options": {}, "audio_seconds": 1.0, "rendered_with": None, "seconds": {}}


def test_rows_survive_a_new_connection_page_and_expire(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(url)
    for i in range(5):
        store.save(state(i, created=100.0 + i, finished=200.0 + i))
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


def test_unfinished_jobs_are_failed_with_the_reason(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.save(state(1, "queued", finished=None))
    store.save(state(2, "running", finished=None))
    store.save(state(3, "done"))
    assert sorted(store.fail_unfinished("restarted")) == [f"{1:032x}", f"{2:032x}"]
    for i in (1, 2):
        s = store.get(f"{i:032x}")
        assert s["status"] == "failed" and s["error"] == "restarted" and s["finished"] is not None
        assert s["progress"]["eta_s"] == 0.0
    assert store.get(f"{3:032x}")["status"] == "done" and store.get(f"{3:032x}")["error"] is None
    assert store.fail_unfinished("again") == []
