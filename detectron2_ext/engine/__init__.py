"""Training and evaluation: detectron2's trainer with our optimizer and evaluators, and the CLI."""
from .cli import build_argument_parser, main, register_datasets_from_args, run, setup
from .trainer import Trainer, build_evaluator, build_optimizer, optimizer_param_groups

__all__ = [
    'Trainer', 'build_optimizer', 'optimizer_param_groups', 'build_evaluator',
    'build_argument_parser', 'register_datasets_from_args', 'setup', 'main', 'run',
]
