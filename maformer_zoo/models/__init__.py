"""timm model families of maformer-zoo, one file per family (timm's layout).

Each module registers its entrypoints with timm on import. ``ZOO_MODULES`` names them so
``maformer_zoo.list_models()`` can tell our models from timm's own.
"""
from .mscsa import *
from .maformer import *

ZOO_MODULES = ['mscsa', 'maformer']
