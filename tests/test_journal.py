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
