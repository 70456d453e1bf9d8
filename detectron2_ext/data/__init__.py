"""Datasets: generated COCO-format scenes, the user's COCO and semantic data, ADE20K (registered on
import, as detectron2 registers its builtin datasets)."""
from .register import (  # noqa: F401
    dataset_num_classes, register_coco_instances_dataset, register_coco_panoptic_dataset, register_synthetic_dataset,
)
from .sem_seg import (  # noqa: F401
    label_format_of, register_ade20k_raw, register_sem_seg_dataset, set_sem_seg_num_classes, write_synthetic_sem_seg,
)
from .sem_seg_labels import LabelFormat, read_label, read_raw_label  # noqa: F401
from .synthetic import CATEGORIES, STUFF_CATEGORIES, THING_CATEGORIES, write_synthetic_coco  # noqa: F401

register_ade20k_raw()
