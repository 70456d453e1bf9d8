"""Training and evaluation: detectron2's trainer with our optimizer/evaluators (the CLI is scripts/train_net.py)."""
from .budget import TimeBudgetHook, TimeIsUp, train_within_budget
from .presets import small_run_opts
from .trainer import Trainer, build_evaluator, build_optimizer, optimizer_param_groups

__all__ = [
    'Trainer', 'build_optimizer', 'optimizer_param_groups', 'build_evaluator',
    'small_run_opts', 'TimeBudgetHook', 'TimeIsUp', 'train_within_budget',
]
