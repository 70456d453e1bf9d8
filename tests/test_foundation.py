"""The package contract of the foundation issue: registration, import isolation, detectron2 glue."""
import json
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_import_registers_without_overwriting_timm_models():
    """`import maformer_zoo` adds models to timm and never replaces one of timm's own."""
    proc = _run("""
        import json, warnings
        import timm
        from timm.models import _registry
        before = dict(_registry._model_entrypoints)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import maformer_zoo
        after = _registry._model_entrypoints
        print(json.dumps(dict(
            replaced=[n for n, fn in before.items() if after.get(n) is not fn],
            added=sorted(set(after) - set(before)),
            zoo=maformer_zoo.list_models(),
            overwrite_warnings=[str(w.message) for w in caught if 'Overwriting' in str(w.message)],
            detectron2_imported='detectron2' in __import__('sys').modules,
        )))
    """)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res['replaced'] == []
    assert res['overwrite_warnings'] == []
    assert res['added'] == res['zoo']
    assert not res['detectron2_imported'], 'maformer_zoo must not import detectron2'


def test_detectron2_ext_without_detectron2_says_how_to_install():
    proc = _run("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == 'detectron2' or name.startswith('detectron2.'):
                    raise ImportError('No module named ' + repr(name))
        sys.meta_path.insert(0, Block())
        try:
            import detectron2_ext
        except ImportError as e:
            print('MSG:', e)
        else:
            print('imported')
    """)
    assert proc.returncode == 0, proc.stderr
    assert 'MSG:' in proc.stdout
    assert 'needs detectron2' in proc.stdout and 'sal-detectron2' in proc.stdout
    assert 'facebookresearch/detectron2' in proc.stdout


@pytest.mark.detectron2
def test_detectron2_mask_rcnn_forward_on_cpu():
    """detectron2 from PyPI builds a Mask R-CNN on CPU, trains one step and runs inference."""
    torch = pytest.importorskip('torch')
    detectron2_ext = pytest.importorskip('detectron2_ext')
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances

    cfg = get_cfg()
    detectron2_ext.add_maformer_zoo_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'))
    cfg.MODEL.WEIGHTS = ''
    cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = 'BN'
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    torch.manual_seed(0)
    model = build_model(cfg)

    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[10., 10., 50., 60.]]))
    inst.gt_classes = torch.tensor([1])
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    mask[0, 10:60, 10:50] = True
    inst.gt_masks = BitMasks(mask)
    model.train()
    from detectron2.utils.events import EventStorage
    with EventStorage(0):
        losses = model([{'image': image, 'instances': inst}])
    assert {'loss_cls', 'loss_box_reg', 'loss_mask', 'loss_rpn_cls', 'loss_rpn_loc'} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad is None  # frozen by FREEZE_AT=2
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model([{'image': image, 'height': 192, 'width': 256}])[0]['instances']
    assert out.image_size == (192, 256)  # rescaled to the requested output size
    assert set(out.get_fields()) >= {'pred_boxes', 'scores', 'pred_classes', 'pred_masks'}
