"""Hydra plugins of coreai-palettize-plugins (discovered through the ``hydra_plugins`` namespace)."""
