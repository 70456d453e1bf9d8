"""Training, fine-tuning and validation of classification models on timm's parts (docs/training.md).

``scripts/train_imagenet.py`` and ``scripts/validate.py`` wrap :func:`train` and :func:`validate`;
recipes live in ``configs/imagenet/``.
"""
from .config import ConfigError, config_from_dict, load_yaml_config, parse_config
from .data import DatasetError
from .engine import evaluate, train
from .modeling import UnknownModelError, create_model_for_run
from .options import EvalConfig, TrainConfig
from .validation import validate
