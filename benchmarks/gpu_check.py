"""One-call GPU check of every model: what a session lent a GPU runs (about 5 minutes on one GPU).

    python benchmarks/gpu_check.py --json gpu_check.json                  # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --json out.json    # CI: same code, tiny sizes

Checks, each a row of the ``--json`` output (a list of flat dicts, like every benchmark here):

* ``train_step``: forward/backward of every model of ``maformer_zoo.list_models()``; loss and every
  gradient finite.
* ``autocast``: bf16 and fp16 autocast forward finite and close to fp32 (relative L2 error).
* ``throughput``: images/s at batch 64 (median of interleaved rounds); MSCSA augmented / base as
  the paper's Table 6, MAFormer-S/B/L against Swin-T.
* ``peak_memory``: ``features_only`` forward at 800x1216 (CUDA peak allocated; not measured on CPU).
* ``mask_rcnn_step``: one Mask R-CNN training step per neck (FPN, FINE, ASFF) with the project's
  ``configs/COCO-InstanceSegmentation/mask_rcnn_resnet18_mscsa_<neck>_1x.yaml``, random weights.

``--tiny`` uses one block per stage and small images, so it runs on CPU in about a minute; a
failing check is reported in its row (``ok: false`` and the error) and the exit status is 1.
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSCSA_PAIRS = ['resnet18', 'resnet50', 'pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'swin_tiny_patch4_window7_224',
               'convnext_tiny']
MAFORMER = ['maformer_s', 'maformer_b', 'maformer_l']
SWIN_T = 'swin_tiny_patch4_window7_224'
NECKS = {'fpn': 'fpn', 'fine': 'fine_fpn', 'asff': 'asff_fpn'}
# one block per stage (the --tiny models); keys are name prefixes
_TINY_KWARGS = {
    'maformer': dict(depths=(1, 1, 1, 1)),
    'resnet': dict(layers=(1, 1, 1, 1)),
    'pvt_v2': dict(depths=(1, 1, 1, 1)),
    'swin': dict(depths=(1, 1, 1, 1)),
    'convnext': dict(depths=(1, 1, 1, 1)),
}


def _create(name: str, tiny: bool, **kwargs: Any) -> torch.nn.Module:
    import timm
    import maformer_zoo  # noqa: F401  (registers the models)
    if tiny:
        small = next(v for k, v in _TINY_KWARGS.items() if name.startswith(k))
        if name.endswith('_mscsa'):
            kwargs.setdefault('base_kwargs', dict(small))
        else:
            kwargs = dict(small, **kwargs)
            if name.startswith('swin'):
                kwargs.setdefault('strict_img_size', False)  # timm's Swin-T baseline at the tiny size
    return timm.create_model(name, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _run(rows: List[dict], check: str, fn: Callable[[], Dict[str, Any]], **key: Any) -> None:
    start = time.perf_counter()
    try:
        row = dict(check=check, **key, ok=True, **fn())
    except Exception as err:  # noqa: BLE001 - a failing check is a result, reported in its row
        row = dict(check=check, **key, ok=False, error=f'{type(err).__name__}: {err}'.splitlines()[0])
        traceback.print_exc()
    row['seconds'] = round(time.perf_counter() - start, 2)
    rows.append(row)


def train_step(name: str, device: torch.device, tiny: bool, size: int, batch: int) -> Dict[str, Any]:
    model = _create(name, tiny).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    if not torch.isfinite(loss) or bad:
        raise RuntimeError(f'loss {loss.item()}, missing or non-finite gradients: {bad[:5]}')
    return dict(loss=loss.item())


def autocast_check(name: str, device: torch.device, tiny: bool, size: int, batch: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = _create(name, tiny).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    out: Dict[str, Any] = {}
    with torch.no_grad():
        ref = model.forward_features(x).float()
        for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
            with torch.autocast(device.type, dtype=dtype):
                y = model.forward_features(x).float()
            key = str(dtype).split('.')[-1]
            err = ((y - ref).norm() / ref.norm()).item()
            out[f'{key}_rel_err'] = err
            if not torch.isfinite(y).all() or err > tol:
                raise RuntimeError(f'{key} autocast: finite={bool(torch.isfinite(y).all())}, rel. error {err:.3g} > {tol}')
    return out


def throughput(names: List[str], device: torch.device, tiny: bool, size: int, batch: int, iters: int,
               amp: bool) -> Dict[str, float]:
    """Median images/s of each model over ``iters`` interleaved rounds (one warm-up round)."""
    models = {n: _create(n, tiny).to(device).eval() for n in names}
    x = torch.randn(batch, 3, size, size, device=device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for step in range(iters + 1):
            for name, model in (models.items() if step % 2 == 0 else reversed(list(models.items()))):
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                if step > 0:
                    times[name].append(time.perf_counter() - start)
    return {n: batch / statistics.median(t) for n, t in times.items()}


def peak_memory(name: str, device: torch.device, tiny: bool, size: List[int]) -> Dict[str, Any]:
    model = _create(name, tiny, features_only=True).to(device).eval()
    x = torch.randn(1, 3, *size, device=device)
    if device.type != 'cuda':
        with torch.inference_mode():
            outs = model(x)
        return dict(peak_mib=None, note='peak memory is measured on CUDA only', strides=len(outs))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize(device)
    return dict(peak_mib=(torch.cuda.max_memory_allocated(device) - before) / 2 ** 20)


def mask_rcnn_step(neck: str, device: torch.device, size: int) -> Dict[str, Any]:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    from detectron2_ext import add_maformer_zoo_config

    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(os.path.join(
        REPO, 'configs', 'COCO-InstanceSegmentation', f'mask_rcnn_resnet18_mscsa_{NECKS[neck]}_1x.yaml'))
    cfg.merge_from_list([
        'MODEL.WEIGHTS', '', 'MODEL.TIMM.PRETRAINED', False, 'MODEL.DEVICE', device.type, 'INPUT.MIN_SIZE_TRAIN', (size,),
        'INPUT.MAX_SIZE_TRAIN', size, 'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE', 64,
        'MODEL.RPN.BATCH_SIZE_PER_IMAGE', 64])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    batch = []
    for _ in range(2):
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
        inst = Instances((size, size))
        x0, y0 = size // 8, size // 6
        boxes = torch.tensor([[x0, y0, size // 2, size // 2], [size // 3, size // 3, size - 8, size - 12]],
                             dtype=torch.float32)
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        for i, (a, b, c, d) in enumerate(boxes.int().tolist()):
            masks[i, b:d, a:c] = True
        inst.gt_boxes, inst.gt_classes, inst.gt_masks = Boxes(boxes), torch.tensor([1, 3]), BitMasks(masks)
        batch.append(dict(image=image, instances=inst, height=size, width=size))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    if not torch.isfinite(total):
        raise RuntimeError(f'non-finite loss: { {k: v.item() for k, v in losses.items()} }')
    return dict(loss=total.item(), **{k: round(v.item(), 4) for k, v in losses.items()})


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='one block per stage, small images (CI on CPU)')
    parser.add_argument('--json', default='', help='write the rows (a list of flat dicts) to this file')
    parser.add_argument('--skip', nargs='*', default=[],
                        choices=['train_step', 'autocast', 'throughput', 'peak_memory', 'mask_rcnn_step'])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('CUDA is not available here; run with --device cpu --tiny for the CPU check.')
    import maformer_zoo
    names = maformer_zoo.list_models()
    size, batch = (64, 2) if args.tiny else (224, 16)
    tput_batch, tput_iters = (2, 1) if args.tiny else (64, 10)
    det_size = [128, 192] if args.tiny else [800, 1216]
    rcnn_size = 128 if args.tiny else 512

    plan: List[tuple] = []
    if 'train_step' not in args.skip:
        plan += [('train_step', dict(model=n), lambda n=n: train_step(n, device, args.tiny, size, batch)) for n in names]
    if 'autocast' not in args.skip:
        plan += [('autocast', dict(model=n), lambda n=n: autocast_check(n, device, args.tiny, size, batch))
                 for n in names]
    if 'throughput' not in args.skip:
        for base in MSCSA_PAIRS:
            def pair(base=base):
                ips = throughput([base, f'{base}_mscsa'], device, args.tiny, size, tput_batch, tput_iters,
                                 device.type == 'cuda')
                return dict(images_per_s_base=ips[base], images_per_s_aug=ips[f'{base}_mscsa'],
                            ratio=ips[f'{base}_mscsa'] / ips[base])
            plan.append(('throughput', dict(model=f'{base}_mscsa', baseline=base, batch_size=tput_batch), pair))

        def maformer_vs_swin():
            ips = throughput(MAFORMER + [SWIN_T], device, args.tiny, size, tput_batch, tput_iters,
                             device.type == 'cuda')
            return {f'ratio_{n}': ips[n] / ips[SWIN_T] for n in MAFORMER} | {'images_per_s_swin_t': ips[SWIN_T]}
        plan.append(('throughput', dict(model='maformer_s/b/l', baseline=SWIN_T, batch_size=tput_batch),
                     maformer_vs_swin))
    if 'peak_memory' not in args.skip:
        plan += [('peak_memory', dict(model=n, size=f'{det_size[0]}x{det_size[1]}'),
                  lambda n=n: peak_memory(n, device, args.tiny, det_size)) for n in names]
    if 'mask_rcnn_step' not in args.skip:
        plan += [('mask_rcnn_step', dict(model='resnet18_mscsa', neck=k), lambda k=k: mask_rcnn_step(
            k, device, rcnn_size)) for k in NECKS]

    rows: List[dict] = []
    meta = dict(benchmark='gpu_check', device=str(device), tiny=args.tiny, torch=torch.__version__)
    for check, key, fn in tqdm(plan, desc='gpu_check', unit='check'):
        _run(rows, check, fn, **key)
        rows[-1] = dict(meta, **rows[-1])
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r['ok']]
    print(f'{len(rows) - len(failed)}/{len(rows)} checks passed', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
