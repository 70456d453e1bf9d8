#!/usr/bin/env python3
"""Train or fine-tune any timm model (ours included) on an image folder or a timm dataset.

Reproduce a paper's ImageNet-1k run (8 GPUs, 128 images each = the papers' batch 1024)::

    torchrun --nproc_per_node 8 scripts/train_imagenet.py -c configs/imagenet/maformer_s.yaml \\
        --data-dir /data/imagenet --batch-size 128

Fine-tune our ImageNet weights on a folder (<root>/train/<class>/*, <root>/val/<class>/*)::

    python scripts/train_imagenet.py -c configs/imagenet/finetune.yaml --model resnet18_mscsa \\
        --pretrained --data-dir /data/my_images --epochs 30

Every field of ``maformer_zoo.training.TrainConfig`` is an option (``--help`` lists them); the
recipe given with ``-c`` sets the starting values. Multi-node: ``torchrun --nnodes N --node-rank R
--master-addr HOST --nproc-per-node G scripts/train_imagenet.py ...`` on every node.
"""
import os
import sys

from timm.utils import setup_default_logging

import maformer_zoo  # noqa: F401  (registers our models with timm)
from maformer_zoo.training import USER_ERRORS, ConfigError, TrainConfig, parse_config, train


def check_output(cfg: TrainConfig) -> None:
    """Where the run folder would go must be usable: one line now instead of a traceback later."""
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise ConfigError(f"--output '{cfg.output}' is a file, not a folder: give the folder that holds run folders "
                          f"(default output/train).")
    run = os.path.join(cfg.output, cfg.experiment) if cfg.experiment else ''
    if run and os.path.islink(run) and not os.path.exists(run):
        raise ConfigError(f"Run folder '{run}' is a symlink to '{os.readlink(run)}', which does not exist: restore "
                          f"its target, remove the link, or choose another --experiment.")


def main(argv=None) -> int:
    setup_default_logging()
    try:
        cfg = parse_config(TrainConfig, argv, description=__doc__.split('\n\n')[0])
        check_output(cfg)
        train(cfg)
    except USER_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
