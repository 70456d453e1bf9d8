"""Training, fine-tuning and validation of classification models on timm's parts (docs/training.md)."""
from ..errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError
from .config import ConfigError, parse_config
from .data import DatasetError
from .engine import evaluate, train
from .modeling import UnknownModelError, create_model_for_run
from .options import EvalConfig, TrainConfig
from .validation import validate

# What the scripts print as one `error:` line (exit status 2) instead of a traceback.
USER_ERRORS = (ConfigError, DatasetError, UnknownModelError, CheckpointMismatchError, PretrainedWeightsNotFoundError,
               CorruptCheckpointError, UnsafeCheckpointError, FileNotFoundError, FileExistsError)
