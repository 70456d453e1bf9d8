"""Datasets: a generated COCO-format dataset of procedural scenes, and dataset registration."""
from .register import (
    dataset_num_classes, register_coco_instances_dataset, register_coco_panoptic_dataset,
    register_synthetic_dataset,
)
from .sem_seg import register_sem_seg_dataset, set_sem_seg_num_classes, write_synthetic_sem_seg
from .synthetic import CATEGORIES, STUFF_CATEGORIES, THING_CATEGORIES, write_synthetic_coco

__all__ = [
    'write_synthetic_coco', 'register_synthetic_dataset', 'register_coco_instances_dataset',
    'register_coco_panoptic_dataset', 'dataset_num_classes',
    'CATEGORIES', 'THING_CATEGORIES', 'STUFF_CATEGORIES',
    'register_sem_seg_dataset', 'set_sem_seg_num_classes', 'write_synthetic_sem_seg',
]
