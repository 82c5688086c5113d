"""The training guard: non-finite steps skipped on every rank, loss spikes rolled back (``trainer.guard``)."""
from .._lazy import lazy_exports

_WHERE = {"ContinueAt": ".rollback", "GuardConfig": ".config", "GuardError": ".callback",
          "GuardLedger": ".callback", "Rollback": ".callback", "StepGuard": ".callback",
          "step_applied": ".callback"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
