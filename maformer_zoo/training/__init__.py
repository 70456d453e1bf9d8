"""Training, fine-tuning and validation of classification models on timm's parts (docs/training.md)."""
from ..errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError
from .config import ConfigError, parse_config
from .data import DatasetError
from .engine import evaluate, train
from .modeling import UnknownModelError, create_model_for_run
from .options import EvalConfig, TrainConfig
from .validation import validate

# The errors a user's input causes: the scripts print them as one `error:` line (exit status 2).
USER_ERRORS = (ConfigError, DatasetError, UnknownModelError, CheckpointMismatchError, PretrainedWeightsNotFoundError,
               CorruptCheckpointError, UnsafeCheckpointError, FileNotFoundError, FileExistsError)
