"""Training, fine-tuning and validation of classification models on timm's parts (docs/training.md)."""
from .config import ConfigError, parse_config
from .data import DatasetError
from .engine import evaluate, train
from .modeling import UnknownModelError, create_model_for_run
from .options import EvalConfig, TrainConfig
from .validation import validate
