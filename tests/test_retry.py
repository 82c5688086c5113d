"""One retry policy for storage: exponential backoff, final errors not retried, one line per retry; the
checkpoint mirror and the shard reader both go through it."""
from __future__ import annotations

import logging

import pytest

from pipeline.checkpoint.mirror import Mirror
from pipeline.data.storage import StorageError
from pipeline.retry import Attempts, RetryPolicy


def test_backoff_doubles_and_gives_up_after_the_retries(caplog):
    waits: list[float] = []
    attempts = Attempts(RetryPolicy(retries=3, backoff_s=0.5), "upload x", final=(PermissionError,),
                        sleep=waits.append)
    with caplog.at_level(logging.WARNING, "pipeline.retry"):
        assert [attempts.retry(ConnectionError("reset")) for _ in range(4)] == [True, True, True, False]
    assert waits == [0.5, 1.0, 2.0] and attempts.exhausted
    assert [r.getMessage() for r in caplog.records] == [
        f"upload x failed (reset); retry {i} of 3 in {w:.0f} s" for i, w in zip((1, 2, 3), waits)]


def test_a_final_error_is_not_retried():
    waits: list[float] = []
    attempts = Attempts(RetryPolicy(), "read y", final=(PermissionError,), sleep=waits.append)
    assert not attempts.retry(PermissionError("denied")) and waits == [] and not attempts.exhausted


def test_the_mirror_retries_transient_errors_with_its_policy(tmp_path, monkeypatch, caplog):
    mirror = Mirror(str(tmp_path / "bucket"), RetryPolicy(retries=2, backoff_s=0.0))
    real, failures = mirror.fs.pipe_file, iter([ConnectionResetError("reset"), None])

    def flaky(*args, **kwargs):
        if (err := next(failures, None)) is not None:
            raise err
        return real(*args, **kwargs)

    monkeypatch.setattr(mirror.fs, "pipe_file", flaky)
    with caplog.at_level(logging.WARNING, "pipeline.retry"):
        mirror.put_text("note.txt", "hello")
    assert mirror.get_text("note.txt") == "hello"
    assert [r.getMessage() for r in caplog.records] == [
        f"{mirror.url}: writing note.txt failed (reset); retry 1 of 2 in 0 s"]

    monkeypatch.setattr(mirror.fs, "pipe_file", lambda *a, **k: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(StorageError):
        mirror.put_text("note.txt", "again")
