"""Export folders: a trained network's weights (safetensors) and the ``metadata.json`` that rebuilds it offline.
``files`` is the format every objective shares; ``vit`` and ``timm_classifier`` the built-in networks'."""
