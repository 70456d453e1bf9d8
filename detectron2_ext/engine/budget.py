"""Train for ``SOLVER.MAX_ITER`` iterations or a wall-clock budget, whichever ends first.

detectron2's loop runs a fixed ``range(start_iter, max_iter)``; a hook cannot shorten it. The
budget hook therefore raises :class:`TimeIsUp` after the step that crosses the budget, and
:func:`train_within_budget` catches it, saves ``model_final`` and evaluates, as the end of a full
run would. The demo and the fine-tuning benchmark use it to fit a CPU time budget.
"""
import logging
import time
from typing import Dict, Optional, Tuple

from detectron2.engine import HookBase

__all__ = ['TimeIsUp', 'TimeBudgetHook', 'train_within_budget']


class TimeIsUp(Exception):
    """The training time budget is spent; ``args[0]`` is the number of iterations run."""


class TimeBudgetHook(HookBase):
    """Raise :class:`TimeIsUp` after the first step that ends past ``seconds`` of training."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = 0.0

    def before_train(self):
        self.start = time.perf_counter()

    def after_step(self):
        last = self.trainer.iter + 1 >= self.trainer.max_iter
        if not last and time.perf_counter() - self.start > self.seconds:
            raise TimeIsUp(self.trainer.iter + 1)


class _PlannedStop(logging.Filter):
    """detectron2 logs every exception that ends training with its traceback; not this one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is TimeIsUp)


def train_within_budget(trainer, minutes: Optional[float]) -> Tuple[Optional[Dict], int]:
    """Train ``trainer`` (a :class:`~detectron2_ext.engine.Trainer`) for at most ``minutes``.

    Returns the evaluation results on ``DATASETS.TEST`` and the number of iterations trained.
    ``minutes=None`` trains the full ``SOLVER.MAX_ITER``.
    """
    if minutes is None:
        results = trainer.train()
        return results, trainer.max_iter - trainer.start_iter
    trainer.register_hooks([TimeBudgetHook(60.0 * minutes)])
    train_logger = logging.getLogger('detectron2.engine.train_loop')
    planned_stop = _PlannedStop()
    train_logger.addFilter(planned_stop)
    try:
        results = trainer.train()
        return results, trainer.max_iter - trainer.start_iter
    except TimeIsUp as stop:
        trainer.checkpointer.save('model_final')
        return type(trainer).test(trainer.cfg, trainer.model), stop.args[0] - trainer.start_iter
    finally:
        train_logger.removeFilter(planned_stop)
