"""Training objectives, one module each (``mae``, ``deit``, ``finetune``, ``classify``), each declaring an
``Objective`` (``spec``): its recipe type and the hooks the stages call. ``registry`` maps a recipe's ``task:``
to its objective, including those other distributions declare under the ``vitpipe.objectives`` entry points.
Nothing here imports torch until a hook runs."""
from .._lazy import lazy_exports

_WHERE = {"Embedding": ".spec", "Objective": ".spec", "Training": ".spec", "names": ".registry",
          "objective": ".registry", "objective_of": ".registry", "register": ".registry"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
