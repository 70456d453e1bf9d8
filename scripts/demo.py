#!/usr/bin/env python
"""`make demo`: the smallest real end-to-end run of maformer-zoo, with no downloads.

Builds a timm model registered by maformer_zoo (falling back to timm's resnet18 while no zoo model
is registered) and a detectron2 Mask R-CNN on top of it, and runs both on a generated image.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch


def make_image(height: int = 256, width: int = 320, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test image: coloured shapes on a gradient background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 96)], -1).astype(np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(30, height - 30), rng.integers(30, width - 30), rng.integers(12, 30)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.integers(0, 255, 3)
    return img


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--model', default=None, help='timm model name (default: first zoo model)')
    args = parser.parse_args(argv)

    import timm
    import maformer_zoo
    zoo = maformer_zoo.list_models()
    name = args.model or (zoo[0] if zoo else 'resnet18')
    torch.manual_seed(0)
    image = make_image()
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).unsqueeze(0)

    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.nn.functional.interpolate(x, size=(224, 224), mode='bilinear'))
    print(f'[demo] timm.create_model({name!r}): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M '
          f'params, logits {tuple(logits.shape)} in {time.perf_counter() - t0:.2f}s')

    try:
        import detectron2_ext  # noqa: F401
    except ImportError as err:
        print(f'[demo] skipping detectron2 part: {err}')
        return 0
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2 import model_zoo

    cfg = get_cfg()
    detectron2_ext.add_maformer_zoo_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'))
    cfg.MODEL.WEIGHTS = ''  # offline: random initialisation
    cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    detector = build_model(cfg).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = detector([{'image': torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1),
                         'height': image.shape[0], 'width': image.shape[1]}])[0]['instances']
    print(f'[demo] detectron2 Mask R-CNN (R-18 FPN, random init): {len(out)} detections, '
          f'fields {sorted(out.get_fields())} in {time.perf_counter() - t0:.2f}s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
