"""timm model families, one file each (registered on import); ``ZOO_MODULES`` names them for
``maformer_zoo.list_models()``."""
from .mscsa import *
from .maformer import *

ZOO_MODULES = ['mscsa', 'maformer']
