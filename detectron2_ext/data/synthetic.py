"""Procedural scenes (stuff + occluding things) written as COCO instances, COCO panoptic and Panoptic
FPN's separated semantic labels, all from one label map per image and deterministic from a seed.
Details: docs/detectron2.md#the-generated-dataset-detectron2_extdata. No detectron2 import here.
"""
import json
import os
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
from panopticapi.utils import id2rgb
from pycocotools import mask as mask_util

__all__ = ['THING_CATEGORIES', 'STUFF_CATEGORIES', 'CATEGORIES', 'write_synthetic_coco', 'render_scene',
           'panoptic_to_semantic']

THING_CATEGORIES: List[Dict] = [
    dict(id=1, name='circle', isthing=1, supercategory='shape', color=[220, 20, 60]),
    dict(id=2, name='square', isthing=1, supercategory='shape', color=[0, 130, 200]),
    dict(id=3, name='triangle', isthing=1, supercategory='shape', color=[255, 180, 0]),
]
STUFF_CATEGORIES: List[Dict] = [
    dict(id=4, name='sky', isthing=0, supercategory='background', color=[135, 206, 235]),
    dict(id=5, name='ground', isthing=0, supercategory='background', color=[110, 150, 60]),
    dict(id=6, name='water', isthing=0, supercategory='background', color=[30, 70, 160]),
]
CATEGORIES: List[Dict] = THING_CATEGORIES + STUFF_CATEGORIES
_SKY, _GROUND, _WATER = (c['id'] for c in STUFF_CATEGORIES)


def panoptic_to_semantic(segment_ids: np.ndarray, segments_info: Sequence[Dict],
                         stuff_contiguous_id: Dict[int, int], ignore_label: int = 255) -> np.ndarray:
    """Panoptic segment ids (H, W) -> Panoptic FPN's separated uint8 labels: stuff categories as
    ``stuff_contiguous_id`` maps them (1..S), things 0, crowd and unlisted pixels ``ignore_label``."""
    semantic = np.full(segment_ids.shape, ignore_label, dtype=np.uint8)
    for seg in segments_info:
        if not seg.get('iscrowd', 0):
            semantic[segment_ids == seg['id']] = stuff_contiguous_id.get(seg['category_id'], 0)
    return semantic


def _shape_mask(kind: str, cx: float, cy: float, size: float, angle: float, xx, yy) -> np.ndarray:
    """Pixel centres inside one thing; ``size`` is the circumradius."""
    dx, dy = xx - cx, yy - cy
    if kind == 'circle':
        return dx * dx + dy * dy <= size * size
    # a regular polygon: half-planes in the shape's rotated frame
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    sides = 4 if kind == 'square' else 3
    apothem = size * np.cos(np.pi / sides)
    inside = np.ones_like(u, dtype=bool)
    for k in range(sides):
        theta = 2 * np.pi * k / sides
        inside &= u * np.cos(theta) + v * np.sin(theta) <= apothem
    return inside


def _stuff_labels(rng: np.random.Generator, height: int, width: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Sky above a wavy horizon, ground below, and with probability 0.6 an elliptic lake."""
    horizon = height * rng.uniform(0.25, 0.55)
    amplitude = height * rng.uniform(0.0, 0.08)
    period = width * rng.uniform(0.5, 1.5)
    phase = rng.uniform(0, 2 * np.pi)
    labels = np.where(yy < horizon + amplitude * np.sin(2 * np.pi * xx / period + phase),
                      _SKY, _GROUND).astype(np.int64)
    if rng.uniform() < 0.6:
        cx = rng.uniform(0.2, 0.8) * width
        cy = rng.uniform(horizon + 0.15 * height, 0.95 * height)
        rx, ry = rng.uniform(0.12, 0.3) * width, rng.uniform(0.06, 0.15) * height
        lake = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        labels[lake & (labels == _GROUND)] = _WATER
    return labels


def _stuff_texture(rng: np.random.Generator, labels: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A vertical gradient sky, noisy ground, striped water."""
    base = {c['id']: np.array(c['color'], dtype=np.float64) for c in STUFF_CATEGORIES}
    sky = base[_SKY] + rng.uniform(-25, 25, 3)
    sky_img = sky[None, None, :] * (0.75 + 0.35 * (yy / labels.shape[0]))[..., None]
    ground_img = (base[_GROUND] + rng.uniform(-30, 30, 3))[None, None, :] + rng.normal(0, 12, labels.shape + (1,))
    stripes = np.sin(yy * rng.uniform(0.8, 1.6) + 0.3 * np.sin(xx * 0.2))[..., None]
    water_img = (base[_WATER] + rng.uniform(-20, 20, 3))[None, None, :] + 18 * stripes
    image = np.zeros(labels.shape + (3,), dtype=np.float64)
    for cat, img in ((_SKY, sky_img), (_GROUND, ground_img), (_WATER, water_img)):
        image[labels == cat] = img[labels == cat]
    return image


def render_scene(rng: np.random.Generator, image_size: Tuple[int, int] = (128, 160), max_things: int = 6,
                 min_area: int = 24) -> Tuple[np.ndarray, np.ndarray, List[int], np.ndarray]:
    """One scene of ``image_size`` (h, w), a pure function of ``rng``'s state, as ``(image, thing_index,
    thing_categories, stuff_labels)``: uint8 (H, W, 3), the visible object's index per pixel (-1: stuff), each
    object's category id (1..``max_things`` objects, none under ``min_area`` pixels) and the stuff under them."""
    height, width = image_size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    stuff = _stuff_labels(rng, height, width, xx, yy)
    image = _stuff_texture(rng, stuff, xx, yy)
    things = []
    for _ in range(int(rng.integers(1, max_things + 1))):
        category = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
        size = rng.uniform(0.08, 0.22) * min(height, width)
        cx, cy = rng.uniform(0, width), rng.uniform(0.1 * height, height)
        angle = rng.uniform(0, 2 * np.pi)
        colour = rng.uniform(0, 255, 3)
        shade = rng.uniform(-0.25, 0.25, 2)  # a linear shading across the object
        mask = _shape_mask(category['name'], cx, cy, size, angle, xx, yy)
        things.append((category['id'], mask, colour, shade, (cx, cy, size)))

    # Painter's order: later objects occlude earlier ones. Dropping a too-small object can only
    # grow the visible area of the others, so repeat until every remaining object is large enough.
    while True:
        index = np.full((height, width), -1, dtype=np.int64)
        for i, thing in enumerate(things):
            index[thing[1]] = i
        areas = np.bincount(index[index >= 0], minlength=len(things))
        keep = [i for i, a in enumerate(areas) if a >= min_area]
        if len(keep) == len(things) or not keep:
            break
        things = [things[i] for i in keep]
    if not keep:  # every object fell outside the image: paint none
        things = []
        index[:] = -1
    for i, (_, _, colour, shade, (cx, cy, size)) in enumerate(things):
        sel = index == i
        light = 1 + shade[0] * (xx[sel] - cx) / size + shade[1] * (yy[sel] - cy) / size
        image[sel] = colour[None, :] * np.clip(light, 0.5, 1.5)[:, None]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), index, [t[0] for t in things], stuff


def _split_rng(seed: int, split: str) -> np.random.SeedSequence:
    # crc32, unlike hash(), is the same in every process, so splits stay reproducible.
    return np.random.SeedSequence([int(seed), zlib.crc32(split.encode('utf-8'))])


def write_synthetic_coco(root: str, num_images: int = 8, image_size: Tuple[int, int] = (128, 160),
                         seed: int = 0, split: str = 'train') -> Dict:
    """Write ``num_images`` scenes of ``image_size`` (h, w) under ``root/<split>/``, a pure function of (seed,
    split, image index, image_size); returns the paths (``image_dir``, ``instances_json``, ``panoptic_dir``,
    ``panoptic_json``, ``sem_seg_dir``) and ``categories``."""
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    height, width = (int(s) for s in image_size)
    if height < 16 or width < 16:
        raise ValueError(f'image_size must be at least (16, 16), got {image_size}')
    split_dir = os.path.join(root, split)
    paths = {key: os.path.join(split_dir, name) for key, name in (
        ('image_dir', 'images'), ('instances_json', 'instances.json'), ('panoptic_dir', 'panoptic'),
        ('panoptic_json', 'panoptic.json'), ('sem_seg_dir', 'panoptic_semseg'))}
    for key in ('image_dir', 'panoptic_dir', 'sem_seg_dir'):
        os.makedirs(paths[key], exist_ok=True)
    stuff_contiguous = {c['id']: i + 1 for i, c in enumerate(STUFF_CATEGORIES)}

    images, instances, panoptic = [], [], []
    next_segment_id = 1  # one counter for all segments: a thing segment id == its annotation id
    for image_id, image_seed in enumerate(_split_rng(seed, split).spawn(num_images), start=1):
        image, thing_index, thing_cats, stuff = render_scene(np.random.default_rng(image_seed), (height, width))
        stem = f'{image_id:06d}'
        Image.fromarray(image).save(os.path.join(paths['image_dir'], stem + '.jpg'), quality=95)
        images.append(dict(id=image_id, file_name=stem + '.jpg', height=height, width=width))
        segment_ids, segments_info = np.zeros((height, width), dtype=np.int64), []
        masks = [(category_id, thing_index == i, True) for i, category_id in enumerate(thing_cats)]
        masks += [(c['id'], (stuff == c['id']) & (thing_index < 0), False) for c in STUFF_CATEGORIES]
        for category_id, mask, is_thing in masks:
            if not mask.any():  # a stuff class absent from the image (every thing is visible)
                continue
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            area, bbox = int(mask.sum()), mask_util.toBbox(rle).tolist()
            if is_thing:
                rle['counts'] = rle['counts'].decode('ascii')
                instances.append(dict(id=next_segment_id, image_id=image_id, category_id=category_id,
                                      segmentation=rle, area=area, bbox=bbox, iscrowd=0))
            segments_info.append(dict(id=next_segment_id, category_id=category_id, area=area, bbox=bbox, iscrowd=0))
            segment_ids[mask] = next_segment_id
            next_segment_id += 1
        Image.fromarray(id2rgb(segment_ids)).save(os.path.join(paths['panoptic_dir'], stem + '.png'))
        Image.fromarray(panoptic_to_semantic(segment_ids, segments_info, stuff_contiguous)).save(
            os.path.join(paths['sem_seg_dir'], stem + '.png'))
        panoptic.append(dict(image_id=image_id, file_name=stem + '.png', segments_info=segments_info))

    info = dict(description=f'maformer-zoo synthetic scenes (seed={seed}, split={split})', version='1.0', year=2026)
    licenses = [dict(id=1, name='CC0-1.0', url='https://creativecommons.org/publicdomain/zero/1.0/')]
    thing_categories = [{k: v for k, v in c.items() if k not in ('isthing', 'color')} for c in THING_CATEGORIES]
    for key, annotations, categories in (('instances_json', instances, thing_categories),
                                         ('panoptic_json', panoptic, CATEGORIES)):
        with open(paths[key], 'w') as f:
            json.dump(dict(info=info, licenses=licenses, images=images, annotations=annotations,
                           categories=categories), f)
    paths['categories'] = [dict(c) for c in CATEGORIES]
    return paths
