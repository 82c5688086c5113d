"""What vitpipe prints while it works: progress for every long step, and none of the third-party noise a
user cannot act on.

Training shows a progress bar on a terminal and one line every ``log_every_n_steps`` optimizer steps otherwise
(a Slurm log, a pod log, a pipe), both with step, loss, images/s and an ETA. Other long loops (sharding,
feature extraction, probes) report through ``Progress``: a line with count, rate and ETA every few seconds.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

# Lightning's start-up lines that say nothing about this run, matched at the start of the message.
_LIGHTNING_CHATTER = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:",
                      "Experiment with name", "`Trainer.fit` stopped:")


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence what other libraries print that a vitpipe user cannot act on; real warnings stay."""
    # vitpipe detects Slurm itself (distributed.environment) and says nothing is wrong when not under srun.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used")
    # Lightning's own pytree helper calls a torch API that newer torch deprecates: nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    chatter = _DropLines(_LIGHTNING_CHATTER)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.loggers.mlflow"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(chatter)
    # A new SQLite store announces its schema migration line by line.
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow's download bar for three small files; the stage prints what it loaded.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class _CurrentStream(logging.Handler):
    """Plain lines on whatever ``sys.stdout`` / ``sys.stderr`` is when a record is emitted (a test's capture,
    a redirected stream), as ``print`` would write them."""

    def __init__(self, stream: str):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        out = getattr(sys, self.stream)
        out.write(self.format(record) + "\n")
        out.flush()


def _reporter(name: str, stream: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:  # an application that configured this logger keeps its own handlers
        logger.addHandler(_CurrentStream(stream))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


# What a stage reports to its user (results, the lines a run ends with, next steps): stdout, one plain line per
# message. Notes beside a command's output (which cluster profile a job file used): stderr, so the output
# itself can be redirected. Library code says things through these loggers, never print(); an application
# embedding vitpipe reconfigures or silences them like any logger.
report = _reporter("pipeline.report", "stdout")
notes = _reporter("pipeline.notes", "stderr")


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Periodic lines for a long loop: ``label: 3,000/10,000 images (30%), 120/s, ETA 58s``.

    The first line comes after ``every_s`` seconds, so a loop that ends sooner prints nothing."""

    def __init__(self, label: str, total: int | None = None, unit: str = "", every_s: float = 5.0,
                 out: TextIO | None = None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.out = out or sys.stderr
        self.done = 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.line(now), file=self.out, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        rate = self.done / max(elapsed, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = duration(left) if left != float("inf") else "?"
            return (f"{self.label}: {self.done:,}/{self.total:,}{unit} ({self.done / self.total:.0%}), "
                    f"{rate:,.1f}/s, ETA {eta}")
        return f"{self.label}: {self.done:,}{unit}, {rate:,.1f}/s, {duration(elapsed)} elapsed"

    def wrap(self, items: Iterable[T], size: Any = None) -> Iterator[T]:
        """Iterate ``items``, counting each (or ``size(item)`` of each)."""
        for item in items:
            yield item
            self.update(size(item) if size else 1)


def vitpipe_executable() -> str:
    """How to call vitpipe in a command printed for the user: this environment's ``vitpipe`` script by its
    absolute path, so the command works as printed in a fresh shell without activating the environment."""
    script = os.path.join(os.path.dirname(sys.executable), "vitpipe")
    return script if os.path.isfile(script) else "vitpipe"


def is_terminal(stream: TextIO | None = None) -> bool:
    """A terminal a progress bar can be drawn on: a tty with a width (a pseudo-terminal without a size, as
    some wrappers give, draws nothing)."""
    stream = stream or sys.stdout
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):
        return False
