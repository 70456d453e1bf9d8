"""timm model families of maformer-zoo, one file per family (timm's layout).

Each module registers its entrypoints with timm on import. ``ZOO_MODULES`` names them so
``maformer_zoo.list_models()`` can tell our models from timm's own.
"""
ZOO_MODULES = []
