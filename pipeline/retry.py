"""The one retry policy for storage operations that fail transiently (the checkpoint mirror's uploads and
downloads, the shard reader's re-opens): how many retries, exponential backoff, which errors are final, and
one log line per retry. (MLflow logging has its own circuit breaker: a tracking outage must not stall
training, so it drops calls instead of waiting.)"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class RetryPolicy:
    retries: int = 3
    """Retries after the first failure, before giving up."""
    backoff_s: float = 2.0
    """Wait before the first retry; doubled for each next one."""

    def delay(self, failure: int) -> float:
        """Seconds to wait after the ``failure``-th failure (1-based)."""
        return self.backoff_s * 2 ** (failure - 1)


class Attempts:
    """The retries of one operation: ``retry(err)`` waits and returns True while the error is transient and
    retries are left; False when the caller should give up (a final error, or the retries spent)."""

    def __init__(self, policy: RetryPolicy, what: str, final: tuple[type[BaseException], ...] = (),
                 sleep: Callable[[float], None] = time.sleep):
        self.policy, self.what, self.final, self.sleep = policy, what, final, sleep
        self.failures = 0

    def retry(self, err: BaseException, where: str = "") -> bool:
        if isinstance(err, self.final):
            return False
        self.failures += 1
        if self.failures > self.policy.retries:
            return False
        delay = self.policy.delay(self.failures)
        log.warning("%s failed (%s); retry %d of %d in %.0f s%s", self.what, err, self.failures, self.policy.retries,
                    delay, where)
        self.sleep(delay)
        return True

    @property
    def exhausted(self) -> bool:
        return self.failures > self.policy.retries
