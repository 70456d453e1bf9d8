"""Training and evaluation: detectron2's trainer with our optimizer and evaluators (the CLI is scripts/train_net.py)."""
from .trainer import Trainer, build_evaluator, build_optimizer, optimizer_param_groups

__all__ = ['Trainer', 'build_optimizer', 'optimizer_param_groups', 'build_evaluator']
