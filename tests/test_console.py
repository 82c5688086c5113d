"""What long steps print: Progress lines for loops, and the training lines of a log (no terminal)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import torch

from pipeline.console import Progress, duration
from pipeline.tracking.progress import StepLines


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (0.4, 59, 75, 3599, 4000)] == ["0s", "59s", "1m15s", "59m59s", "1h06m"]


def test_progress_says_count_share_rate_and_eta_and_nothing_for_a_short_loop():
    out = io.StringIO()
    quiet = Progress("short", 10, "images", every_s=3600, out=out)
    list(quiet.wrap(range(10)))
    assert out.getvalue() == ""  # done before the first line was due

    progress = Progress("features", 1000, "images", every_s=0, out=out)
    list(progress.wrap([100] * 4, size=lambda n: n))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("features: 400/1,000 images (40%), ")
    assert "/s, ETA " in lines[-1]


def test_log_lines_come_every_n_steps_with_metrics_and_between_them_when_steps_are_slow():
    out = io.StringIO()
    metrics = {"train/loss": torch.tensor(0.5), "perf/images_per_s": torch.tensor(12.0)}
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, max_steps=6, callback_metrics=metrics)
    lines = StepLines(every_n_steps=3, out=out, quiet_s=0.0)  # slow steps: a line after every one
    lines.on_train_start(trainer, None)
    for step in range(1, 7):
        trainer.global_step = step
        lines.on_train_batch_end(trainer, None, None, None, step - 1)
        lines.on_train_batch_end(trainer, None, None, None, step - 1)  # a second micro-batch: no new line
    printed = out.getvalue().splitlines()
    assert [p.split(",")[0] for p in printed] == [f"step {s}/6 ({s / 6:.0%})" for s in range(1, 7)]
    # metrics are read only on logging steps (3 and 6), where Lightning has reduced them anyway
    assert [("loss 0.5000" in p, "12.0 img/s" in p) for p in printed] == [(s % 3 == 0,) * 2 for s in range(1, 7)]

    out.truncate(0)
    out.seek(0)
    fast = StepLines(every_n_steps=3, out=out, quiet_s=3600.0)
    trainer.global_step = 0
    fast.on_train_start(trainer, None)
    for step in range(1, 7):
        trainer.global_step = step
        fast.on_train_batch_end(trainer, None, None, None, step - 1)
    assert [p.split(",")[0] for p in out.getvalue().splitlines()] == ["step 3/6 (50%)", "step 6/6 (100%)"]
