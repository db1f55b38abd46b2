"""The journal of decisions (workers/journal.py) on a real SQLite file."""

from __future__ import annotations

import sqlite3

from workers.journal import Journal


def _outputs(i: str) -> list[list]:
    return [["verdicts", i, "{}", {}]]


def test_a_long_running_journal_prunes_old_decisions_as_it_records(tmp_path):
    path = tmp_path / "stage.sqlite"
    journal = Journal(path, retention_s=3600, prune_every_s=0)
    journal.record({"old": _outputs("old")})
    with sqlite3.connect(path) as db:  # "old" was decided two hours ago
        db.execute("UPDATE decisions SET created_at = created_at - 7200 WHERE input_id = 'old'")
    journal.record({"new": _outputs("new")})
    assert set(journal.get(["old", "new"])) == {"new"}
    journal.close()


def test_a_closed_journal_reopens_with_its_decisions(tmp_path):
    path = tmp_path / "stage.sqlite"
    journal = Journal(path)
    journal.record({"a": _outputs("a")})
    journal.close()
    assert Journal(path).get(["a"]) == {"a": _outputs("a")}


def test_workers_opening_a_new_journal_at_once_all_open_it(tmp_path):
    """Two filter workers start on one journal file that does not exist yet: switching a fresh
    file to WAL takes a lock SQLite does not wait for, and one of them failed with "database is
    locked" (tests/test_filter_workers.py, two filter workers)."""
    import threading

    errors: list[Exception] = []
    for attempt in range(20):  # a fresh file each time: the race is on the first open
        path = tmp_path / f"filter{attempt}.sqlite"
        barrier = threading.Barrier(6)

        def open_journal(path=path, barrier=barrier) -> None:
            barrier.wait()
            try:
                Journal(path).close()
            except Exception as exc:  # noqa: BLE001 - the failure is what is asserted
                errors.append(exc)

        threads = [threading.Thread(target=open_journal) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
