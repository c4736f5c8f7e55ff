"""The device journal keeps each receipt's output opening (what a dispute reveals), and opens
a journal written before openings existed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from secure_ci.device import DEFAULT_DOMAIN, TaskReceipt
from secure_ci.device._journal import DeviceJournal
from secure_ci.ledger import open_output
from secure_ci.ledger._records import TaskRequest, TaskResult, keccak256


def _receipt(tag: bytes, *, opened: bool) -> TaskReceipt:
    request = TaskRequest(
        keccak256(b"task" + tag), b"\x01" * 20, 1, keccak256(b"model"), 2, keccak256(tag),
        b"\x02" * 20, 2**40,
    )  # fmt: skip
    opening = open_output(b"\x03" * 32, b"\x04" * 32, b"T\x00\x01" + tag, b"payload" + tag)
    result = TaskResult(
        request.task_id, request.struct_hash(), opening.commitment(), b"\x05" * 32, b"\x06" * 32,
        0, 3, 7,
    )  # fmt: skip
    return TaskReceipt(
        request, result, b"\x07" * 65, b"\x08" * 65, b"\x04" * 32, b"\x03" * 32, DEFAULT_DOMAIN,
        opening if opened else None,
    )  # fmt: skip


def test_openings_survive_the_journal(tmp_path: Path) -> None:
    opened, bare = _receipt(b"a", opened=True), _receipt(b"b", opened=False)
    with DeviceJournal.open(tmp_path / "d.db") as book:
        book.record(opened)
        book.record(bare)
    with DeviceJournal.open(tmp_path / "d.db") as book:
        tasks = {t.task_id: t.receipt for t in book.tasks()}
    assert tasks[opened.request.task_id].opening == opened.opening
    assert tasks[opened.request.task_id].opening.commitment() == opened.result.output_commitment  # type: ignore[union-attr]
    assert tasks[bare.request.task_id].opening is None


def test_a_journal_from_before_openings_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with DeviceJournal.open(path) as book:
        book.record(_receipt(b"old", opened=True))
    conn = sqlite3.connect(path)  # as written before the opening column existed
    try:
        with conn:
            conn.execute("ALTER TABLE tasks DROP COLUMN opening")
    finally:
        conn.close()
    with DeviceJournal.open(path) as book:
        (old,) = book.tasks()
        assert old.receipt.opening is None
        book.record(_receipt(b"new", opened=True))
        assert sum(t.receipt.opening is not None for t in book.tasks()) == 1
