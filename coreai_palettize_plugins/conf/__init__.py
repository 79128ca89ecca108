"""Hydra config groups shipped with the package: ``palettize/`` and ``callbacks/palettize.yaml``.

Every Hydra app finds them through the search path plugin in ``hydra_plugins`` (installed with
the package); an app can also list them explicitly:
``hydra: {searchpath: [pkg://coreai_palettize_plugins.conf]}``.
"""
