"""COCO instances / panoptic datasets registered with detectron2 (``load_coco_json``) after checking
at once what training would trip over, each mistake one line naming the fix; the generated scenes
registered in both forms. docs/detectron2.md#the-generated-dataset-detectron2_extdata.
"""
import json
import logging
import os
from collections.abc import Hashable
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from maformer_zoo.data.images import ImageDecodeError, read_image_header
from maformer_zoo.utils.safe_yaml import short_repr

from .synthetic import panoptic_to_semantic

__all__ = ['check_coco_instances', 'register_coco_instances_dataset', 'register_coco_panoptic_dataset',
           'register_synthetic_dataset', 'dataset_num_classes']
logger = logging.getLogger(__name__)


def _existing(option: str, *paths: Tuple[str, str]) -> List[str]:
    """The absolute paths of ``(what, path)`` pairs ('Image directory', 'COCO json file'...), which must exist."""
    for what, path in paths:
        if not (os.path.isdir if what.endswith('directory') else os.path.isfile)(path):
            raise FileNotFoundError(f"{what} '{path}' does not exist (given to {option}). Check the path; relative "
                                    f"paths are resolved from the current directory '{os.getcwd()}'.")
    return [os.path.abspath(path) for _, path in paths]


def _load_json(path: str) -> Dict:
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as err:
            line = getattr(err, 'lineno', '?')
            raise ValueError(f"'{path}' is not valid JSON (line {line}): fix or re-export it.") from None
    if not isinstance(data, dict) or 'categories' not in data or 'images' not in data:
        raise ValueError(f"'{path}' is not a COCO json: it needs 'images' and 'categories' keys.")
    for key in ('images', 'categories', 'annotations'):
        if not isinstance(data.get(key, []), list) or not all(isinstance(x, dict) for x in data.get(key, [])):
            raise ValueError(f"'{key}' of '{path}' must be a list of objects; re-export the json.")
    return data


def _check_image(path: str, size: Tuple[int, int], given_by: str, prefix: str = '') -> None:
    """The image ``path`` decodes (header) and is ``size`` (w, h) once EXIF-oriented, as it is read; else one
    line starting with ``prefix``, ``given_by`` saying where ``size`` comes from."""
    try:
        stored, (width, height), orientation = read_image_header(path)
    except ImageDecodeError as err:
        raise ValueError(f"{prefix}{err}") from None
    if tuple(size) == stored != (width, height):
        raise ValueError(
            f"{prefix}image '{path}' is stored as {stored[0]}x{stored[1]}, as {given_by}, but its EXIF orientation "
            f"({orientation}) turns it to {width}x{height}, which is how it is read: save the image upright "
            f"without the EXIF orientation (PIL.ImageOps.exif_transpose).")
    if tuple(size) != (width, height):
        raise ValueError(f"{prefix}image '{path}' is {width}x{height} but {given_by}; fix the one that is wrong.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_polygon(p) -> bool:
    return isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_number, p))


# (field, whether a value is valid given the json's image and category ids, the message)
_ANNOTATION_RULES = (
    ('bbox', lambda v, ids: isinstance(v, (list, tuple)) and len(v) == 4 and all(map(_is_number, v))
     and v[2] >= 0 and v[3] >= 0,
     "'bbox' is {value}; COCO boxes are [x, y, width, height], 4 numbers (width and height >= 0, not corners): "
     "fix or remove the annotation."),
    ('category_id', lambda v, ids: isinstance(v, int) and not isinstance(v, bool) and v in ids['categories'],
     "'category_id' is {value}; it must be one of the integer ids of 'categories' ({categories}): fix it."),
    ('image_id', lambda v, ids: isinstance(v, Hashable) and v in ids['images'],
     "'image_id' {value} is not the id of an image of the json; fix it or remove the annotation."),
    ('iscrowd', lambda v, ids: v in (0, 1) and not isinstance(v, bool),
     "'iscrowd' is {value}; COCO annotations need iscrowd 0 (an object) or 1 (a crowd region): add it."),
    ('segmentation', lambda v, ids: v is None or (all(k in v for k in ('counts', 'size')) if isinstance(v, dict)
                                                  else isinstance(v, list) and all(map(_is_polygon, v))),
     "'segmentation' is {value}; use polygons (lists of 3 or more x, y numbers) or an RLE object with 'counts' "
     "and 'size'."),
)


def check_coco_instances(json_file: str, image_dir: str, data: Optional[Dict] = None) -> Dict:
    """The checks of :func:`register_coco_instances_dataset`: images, sizes, annotation fields.

    Returns counts for the checks against the config (annotations, non-crowd ones, mask formats).
    Raises ``ValueError`` or ``FileNotFoundError`` with one line naming the entry and the fix.
    """
    data = data if data is not None else _load_json(json_file)
    images, image_ids = data['images'], {}
    for i, im in enumerate(images):
        missing = [k for k in ('id', 'file_name', 'width', 'height') if im.get(k) is None]
        if missing:
            raise ValueError(f"Image {i} of '{json_file}' ({short_repr(im.get('file_name'))}) has no "
                             f"{', '.join(missing)}; COCO images need id, file_name, width and height: add them.")
        if im['id'] in image_ids:
            raise ValueError(f"Images {image_ids[im['id']]} and {i} of '{json_file}' share id "
                             f"{short_repr(im['id'])}; give every image its own id.")
        image_ids[im['id']] = i
    absent = [im for im in images if not os.path.isfile(os.path.join(image_dir, im['file_name']))]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} of the {len(images)} images of '{json_file}' are not in '{image_dir}' (first: "
            f"'{absent[0]['file_name']}'); check IMAGE_DIR, or remove their entries from the json.")
    for im in images:
        _check_image(os.path.join(image_dir, im['file_name']), (im['width'], im['height']),
                     f"the json gives width {im['width']}, height {im['height']}", prefix=f"'{json_file}': ")
    ids = dict(images=image_ids, categories={c.get('id') for c in data['categories']})
    annotations = data.get('annotations', [])
    for i, ann in enumerate(annotations):
        for key, valid, rule in _ANNOTATION_RULES:
            if not valid(ann.get(key), ids):
                value = short_repr(ann[key]) if key in ann else 'missing'
                raise ValueError(f"Annotation {i} (id {short_repr(ann.get('id'))}) of '{json_file}': "
                                 + rule.format(value=value, categories=sorted(ids['categories'])[:10]))
    formats = {'rle' if isinstance(a.get('segmentation'), dict) else 'polygon'
               for a in annotations if a.get('segmentation')}
    return dict(num_annotations=len(annotations), mask_formats=sorted(formats),
                num_trainable_annotations=sum(a['iscrowd'] == 0 for a in annotations))


def _colors(categories: List[Dict]) -> List[List[int]]:
    rng = np.random.default_rng(0)  # the same drawn colours at every registration
    return [list(c['color']) if 'color' in c else rng.integers(0, 256, 3).tolist() for c in categories]


def _thing_metadata(categories: List[Dict]) -> Dict:
    categories = sorted(categories, key=lambda c: c['id'])
    return dict(thing_classes=[c['name'] for c in categories], thing_colors=_colors(categories),
                thing_dataset_id_to_contiguous_id={c['id']: i for i, c in enumerate(categories)})


def _register_once(name: str, loader: Callable[[], List[Dict]], metadata: Dict) -> None:
    """Register ``name`` unless the identical registration exists; differing ones are an error."""
    if name in DatasetCatalog.list():
        previous = MetadataCatalog.get(name).get('registration', None)
        if previous == metadata['registration']:
            return
        raise ValueError(f"Dataset '{name}' is already registered with different files ({previous}); pick another "
                         f"name or remove it with DatasetCatalog.remove('{name}').")
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_coco_instances_dataset(name: str, json_file: str, image_dir: str) -> None:
    """Register a COCO instances json (boxes, masks as polygons or RLE; ``file_name`` relative to
    ``image_dir``) as ``name``, with the metadata of detectron2's ``register_coco_instances``."""
    json_file, image_dir = _existing('--coco-dataset NAME JSON IMAGE_DIR', ('COCO instances json file', json_file),
                                     ('Image directory', image_dir))
    data = _load_json(json_file)
    metadata = dict(json_file=json_file, image_root=image_dir, evaluator_type='coco',
                    registration=dict(kind='coco_instances', json_file=json_file, image_dir=image_dir),
                    **check_coco_instances(json_file, image_dir, data), **_thing_metadata(data['categories']))
    _register_once(name, lambda: load_coco_json(json_file, image_dir, name), metadata)


def _check_panoptic(pan: Dict, path: str) -> None:
    """One line naming the first annotation or segment that lacks what COCO panoptic defines."""
    if 'annotations' not in pan:
        raise ValueError(f"'{path}' has no 'annotations' list: is it a COCO panoptic json (not an instances json)?")
    if any('isthing' not in c for c in pan['categories']):
        raise ValueError(f"Categories in '{path}' need an 'isthing' field (COCO panoptic).")
    category_ids = {c.get('id') for c in pan['categories']}
    for i, ann in enumerate(pan['annotations']):
        missing = [k for k in ('file_name', 'segments_info') if k not in ann]
        if missing:
            raise ValueError(f"Annotation {i} of '{path}' lacks {missing}: COCO panoptic annotations need "
                             f"'file_name' and 'segments_info'.")
        for segment in ann['segments_info']:
            if 'id' not in segment or segment.get('category_id') not in category_ids:
                raise ValueError(f"A segment of annotation {i} ('{ann['file_name']}') in '{path}' needs an "
                                 f"'id' and a 'category_id' listed in 'categories'; it has {segment}.")


def register_coco_panoptic_dataset(name: str, image_dir: str, panoptic_dir: str, panoptic_json: str,
                                   instances_json: str, sem_seg_dir: Optional[str] = None) -> None:
    """Register COCO panoptic data for Panoptic FPN as ``name`` (detectron2's "separated" form): the
    annotations of ``instances_json`` (same images and thing categories) and a ``sem_seg_file_name`` in
    ``sem_seg_dir`` (default ``<panoptic_dir>_semseg``; stuff ``1..S``, things ``0``), written from the
    panoptic PNGs where missing. Evaluation: PQ on the panoptic PNGs, mIoU on the semantic."""
    image_dir, panoptic_dir, panoptic_json, instances_json = _existing(
        '--coco-panoptic-dataset NAME IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON INSTANCES_JSON',
        ('Image directory', image_dir), ('Panoptic PNG directory', panoptic_dir),
        ('COCO panoptic json file', panoptic_json), ('COCO instances json file', instances_json))
    sem_seg_dir = os.path.abspath(sem_seg_dir or panoptic_dir.rstrip(os.sep) + '_semseg')
    pan = _load_json(panoptic_json)
    _check_panoptic(pan, panoptic_json)
    things = [c for c in pan['categories'] if c['isthing']]
    stuff = sorted((c for c in pan['categories'] if not c['isthing']), key=lambda c: c['id'])
    instances = _load_json(instances_json)
    counts = check_coco_instances(instances_json, image_dir, instances)
    thing_ids, instance_ids = (sorted(c['id'] for c in cats) for cats in (things, instances['categories']))
    if thing_ids != instance_ids:
        raise ValueError(f"The thing categories of '{panoptic_json}' (ids {thing_ids}) and the categories of "
                         f"'{instances_json}' (ids {instance_ids}) must be the same.")
    stuff_contiguous = {c['id']: i + 1 for i, c in enumerate(stuff)}
    missing = [ann for ann in pan['annotations'] if not os.path.isfile(os.path.join(sem_seg_dir, ann['file_name']))]
    if missing:
        logger.info(f'Writing {len(missing)} stuff-only semantic PNGs for Panoptic FPN to {sem_seg_dir}')
        try:
            os.makedirs(sem_seg_dir, exist_ok=True)
        except OSError as err:
            raise OSError(f"Cannot create '{sem_seg_dir}' for the semantic labels Panoptic FPN needs "
                          f"({err}); pass a writable sem_seg_dir.") from err
    for ann in missing:
        ids = rgb2id(np.asarray(Image.open(os.path.join(panoptic_dir, ann['file_name'])).convert('RGB')))
        semantic = panoptic_to_semantic(ids, ann['segments_info'], stuff_contiguous)
        Image.fromarray(semantic).save(os.path.join(sem_seg_dir, ann['file_name']))

    def load() -> List[Dict]:
        dicts = load_coco_json(instances_json, image_dir, name)
        for d in dicts:
            stem = os.path.splitext(os.path.basename(d['file_name']))[0]
            d['sem_seg_file_name'] = os.path.join(sem_seg_dir, stem + '.png')
        return dicts

    metadata = dict(
        image_root=image_dir, panoptic_root=panoptic_dir, panoptic_json=panoptic_json, sem_seg_root=sem_seg_dir,
        json_file=instances_json, evaluator_type='coco_panoptic_seg', ignore_label=255, label_divisor=1000, **counts,
        stuff_classes=['things'] + [c['name'] for c in stuff], stuff_colors=[[82, 18, 128]] + _colors(stuff),
        # 0 is the "things" class of the separated semantic labels (detectron2's convention).
        stuff_dataset_id_to_contiguous_id={0: 0, **stuff_contiguous},
        registration=dict(kind='coco_panoptic', image_dir=image_dir, panoptic_dir=panoptic_dir,
                          panoptic_json=panoptic_json, instances_json=instances_json, sem_seg_dir=sem_seg_dir),
        **_thing_metadata(things),
    )
    _register_once(name, load, metadata)


def register_synthetic_dataset(name: str, root: str, split: str = 'train') -> Dict[str, str]:
    """Register ``root/<split>`` of ``write_synthetic_coco`` as ``name`` (instances) and ``name_panoptic``
    (separated panoptic); returns the two names. Its masks are RLE: configs need ``INPUT.MASK_FORMAT bitmask``."""
    split_dir = os.path.join(root, split)
    if not os.path.isfile(os.path.join(split_dir, 'instances.json')):
        raise FileNotFoundError(f"No synthetic dataset at '{split_dir}': write it first with "
                                f"detectron2_ext.data.write_synthetic_coco('{root}', split='{split}').")
    images, instances = os.path.join(split_dir, 'images'), os.path.join(split_dir, 'instances.json')
    register_coco_instances_dataset(name, instances, images)
    register_coco_panoptic_dataset(name + '_panoptic', images, os.path.join(split_dir, 'panoptic'),
                                   os.path.join(split_dir, 'panoptic.json'), instances,
                                   sem_seg_dir=os.path.join(split_dir, 'panoptic_semseg'))
    return dict(instances=name, panoptic=name + '_panoptic')


def dataset_num_classes(name: str) -> Dict[str, int]:
    """Class counts a model needs for a registered dataset: things, and stuff (incl. 'things')."""
    meta = MetadataCatalog.get(name)
    stuff = meta.get('stuff_classes', None)
    return dict(things=len(meta.get('thing_classes', [])), **({} if stuff is None else dict(stuff=len(stuff))))
