#!/usr/bin/env python3
"""Top-1 / top-5 accuracy and loss of a model on a dataset split, with timm's preprocessing.

Examples::

    # our Hub weights on ImageNet val (input size, crop_pct, interpolation, mean/std from the model)
    python scripts/validate.py --model maformer_s --pretrained --data-dir /data/imagenet

    # a fine-tuned checkpoint of ours (classes and preprocessing come from the checkpoint)
    python scripts/validate.py --model resnet18_mscsa --checkpoint output/train/run/model_best.pth \\
        --data-dir /data/my_images --split val

Prints the metrics as JSON (and writes them to --results-file when given).
"""
import json
import sys

import maformer_zoo  # noqa: F401  (registers our models with timm)
from maformer_zoo.training import EvalConfig, run_script, validate


def main(argv=None) -> int:
    return run_script(EvalConfig, lambda cfg: print(json.dumps(validate(cfg), indent=2)), argv, __doc__)


if __name__ == '__main__':
    sys.exit(main())
