"""MLflow tracking set-up and the callbacks that feed it. Knows nothing of training internals."""
from .._lazy import lazy_exports

_WHERE = {"TrackingConfig": ".config", "make_logger": ".mlflow_setup", "resolve_uri": ".config"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
