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

from timm.utils import setup_default_logging

import maformer_zoo  # noqa: F401  (registers our models with timm)
from maformer_zoo.training import USER_ERRORS, EvalConfig, parse_config, validate


def main(argv=None) -> int:
    setup_default_logging()
    try:
        results = validate(parse_config(EvalConfig, argv, description=__doc__.split('\n\n')[0]))
    except USER_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
