#!/usr/bin/env python
"""Train or evaluate a maformer-zoo detector: detectron2's ``tools/train_net.py``, with our configs.

    scripts/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_maformer_s_fine_fpn_1x.yaml \
        --num-gpus 8 [--resume] [--eval-only] [KEY VALUE ...]

Own data without code: ``--coco-dataset NAME JSON IMAGE_DIR`` (repeatable),
``--coco-panoptic-dataset NAME IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON INSTANCES_JSON`` and
``--sem-seg-dataset NAME IMAGE_DIR LABEL_DIR`` (docs/segmentation.md), then
``DATASETS.TRAIN '("NAME",)'``. ``--help`` lists everything; see :mod:`detectron2_ext.engine.cli`.
"""
from detectron2_ext.engine import run

if __name__ == '__main__':
    run()
