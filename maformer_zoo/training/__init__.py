"""Training, fine-tuning and validation of classification models on timm's parts (docs/training.md)."""
import sys

from timm.utils import setup_default_logging

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


def run_script(cls: type, command, argv, doc: str) -> int:
    """A script's ``main``: ``command`` on ``cls`` as :func:`parse_config` reads it; a user error: one line, exit 2."""
    setup_default_logging()
    try:
        command(parse_config(cls, argv, description=doc.split('\n\n')[0]))
    except USER_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0
