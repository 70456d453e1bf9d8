#!/usr/bin/env python
"""Convert the aerial tree photos shipped in the ``deepforest`` package to a COCO detection dataset.

deepforest (MIT, PyPI) ships four annotated photos in ``deepforest/data``: two large NEON crops
(2299x2472 and 1249x1035 px) and two 400x400 tiles, with 951 tree boxes as Pascal VOC XML
(``<name>`` Tree, or Alive / Dead on SOAP_061, all mapped to one class ``tree``). This script cuts
the photos into non-overlapping tiles of about ``--tile`` px (a rest under half a tile joins its
neighbour), keeps a box in the tile holding more than ``--min-visible`` of its area (clipped to
the tile; boxes cut by tile borders are the price of tiling), and splits the tiles at random
(seeded) into train and val COCO jsons::

    pip install --no-deps --target /tmp/deepforest_pkg deepforest==2.1.0  # its data only
    python datasets/deepforest_to_coco.py --data-dir /tmp/deepforest_pkg/deepforest/data \\
        --output output/deepforest

Prints the numbers of tiles and boxes per split. Writes ``<output>/{train,val}.json`` and
``<output>/images/*.png``.
"""
import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

Box = Tuple[float, float, float, float]


def read_voc(xml_path: str) -> Tuple[str, List[Box]]:
    """The image file name and the (xmin, ymin, xmax, ymax) boxes of a Pascal VOC XML file."""
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter('object'):
        bb = obj.find('bndbox')
        boxes.append(tuple(float(bb.find(k).text) for k in ('xmin', 'ymin', 'xmax', 'ymax')))
    return root.find('filename').text, boxes


def tile_spans(length: int, tile: int) -> List[Tuple[int, int]]:
    """Non-overlapping ``(start, end)`` spans covering ``[0, length)``, ``tile`` long; a rest
    shorter than half a tile joins the last span. Tiles never overlap, so no box or pixel can
    appear in both splits."""
    spans = [(start, min(start + tile, length)) for start in range(0, length, tile)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < tile // 2:
        spans[-2:] = [(spans[-2][0], length)]
    return spans


def tile_boxes(boxes: List[Box], x0: int, y0: int, size: Tuple[int, int],
               min_visible: float) -> List[Box]:
    """Boxes clipped to the tile at (x0, y0) of ``size`` (w, h), in tile coordinates."""
    w, h = size
    kept = []
    for xmin, ymin, xmax, ymax in boxes:
        cx0, cy0 = max(xmin, x0), max(ymin, y0)
        cx1, cy1 = min(xmax, x0 + w), min(ymax, y0 + h)
        area = (xmax - xmin) * (ymax - ymin)
        if cx1 <= cx0 or cy1 <= cy0 or area <= 0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) > min_visible * area:
            kept.append((cx0 - x0, cy0 - y0, cx1 - x0, cy1 - y0))
    return kept


def convert(data_dir: str, output: str, tile: int = 400, val_fraction: float = 0.25,
            min_visible: float = 0.5, seed: int = 0) -> Dict[str, Dict[str, int]]:
    xmls = sorted(glob.glob(os.path.join(data_dir, '*.xml')))
    if not xmls:
        raise FileNotFoundError(
            f"No Pascal VOC .xml annotations in '{data_dir}'. Point --data-dir at the 'data' "
            f"folder of the deepforest package (pip install --no-deps --target DIR deepforest).")
    image_dir = os.path.join(output, 'images')
    os.makedirs(image_dir, exist_ok=True)
    tiles = []  # (file_name, width, height, boxes)
    for xml_path in xmls:
        file_name, boxes = read_voc(xml_path)
        image = Image.open(os.path.join(data_dir, file_name)).convert('RGB')
        width, height = image.size
        stem = os.path.splitext(file_name)[0]
        for y0, y1 in tile_spans(height, tile):
            for x0, x1 in tile_spans(width, tile):
                crop = image.crop((x0, y0, x1, y1))
                name = f'{stem}_{x0:05d}_{y0:05d}.png'
                crop.save(os.path.join(image_dir, name))
                tiles.append((name, crop.size[0], crop.size[1],
                              tile_boxes(boxes, x0, y0, crop.size, min_visible)))
    order = np.random.default_rng(seed).permutation(len(tiles))
    num_val = max(1, int(round(val_fraction * len(tiles))))
    splits = {'val': sorted(order[:num_val]), 'train': sorted(order[num_val:])}
    summary = {}
    for split, indices in splits.items():
        images, annotations = [], []
        for image_id, index in enumerate(indices, start=1):
            name, width, height, boxes = tiles[index]
            images.append(dict(id=image_id, file_name=name, width=width, height=height))
            for x0, y0, x1, y1 in boxes:
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=1, iscrowd=0,
                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0)))
        with open(os.path.join(output, f'{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=[dict(id=1, name='tree', supercategory='plant')],
                           info=dict(description='deepforest 2.1.0 sample data, tiled')), f)
        summary[split] = dict(tiles=len(images), boxes=len(annotations))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', required=True, help="deepforest's package data folder")
    parser.add_argument('--output', default=os.path.join('output', 'deepforest'))
    parser.add_argument('--tile', type=int, default=400)
    parser.add_argument('--val-fraction', type=float, default=0.25)
    parser.add_argument('--min-visible', type=float, default=0.5)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    summary = convert(args.data_dir, args.output, args.tile, args.val_fraction, args.min_visible,
                      args.seed)
    for split, counts in summary.items():
        print(f'{split}: {counts["tiles"]} tiles, {counts["boxes"]} boxes -> '
              f'{os.path.join(args.output, split + ".json")}')
    print(f'images: {os.path.join(args.output, "images")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
