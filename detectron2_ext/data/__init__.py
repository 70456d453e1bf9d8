"""Datasets: a generated COCO-format dataset of procedural scenes, and dataset registration."""
from .register import (
    dataset_num_classes, register_coco_instances_dataset, register_coco_panoptic_dataset,
    register_synthetic_dataset,
)
from .sem_seg import (
    label_format_of, register_ade20k_raw, register_sem_seg_dataset, set_sem_seg_num_classes,
    write_synthetic_sem_seg,
)
from .sem_seg_labels import LabelFormat, read_label, read_raw_label
from .synthetic import CATEGORIES, STUFF_CATEGORIES, THING_CATEGORIES, write_synthetic_coco

__all__ = [
    'write_synthetic_coco', 'register_synthetic_dataset', 'register_coco_instances_dataset',
    'register_coco_panoptic_dataset', 'dataset_num_classes',
    'CATEGORIES', 'THING_CATEGORIES', 'STUFF_CATEGORIES',
    'register_sem_seg_dataset', 'set_sem_seg_num_classes', 'write_synthetic_sem_seg',
    'register_ade20k_raw', 'label_format_of', 'LabelFormat', 'read_label', 'read_raw_label',
]

register_ade20k_raw()  # as detectron2 registers its builtin datasets on import
