"""Training and evaluation: detectron2's trainer with our optimizer/evaluators, and the CLI."""
from .budget import TimeBudgetHook, TimeIsUp, train_within_budget
from .cli import build_argument_parser, main, register_datasets_from_args, run, setup
from .presets import small_run_opts
from .trainer import Trainer, build_evaluator, build_optimizer, optimizer_param_groups

__all__ = [
    'Trainer', 'build_optimizer', 'optimizer_param_groups', 'build_evaluator',
    'build_argument_parser', 'register_datasets_from_args', 'setup', 'main', 'run',
    'small_run_opts', 'TimeBudgetHook', 'TimeIsUp', 'train_within_budget',
]
