"""MLflow tracking set-up and the callbacks that feed it. Knows nothing of training internals."""
from .mlflow_setup import TrackingConfig, make_logger, resolve_uri, ui_command

__all__ = ["TrackingConfig", "make_logger", "resolve_uri", "ui_command"]
