"""Deploying detectors with detectron2's own export tools, for our backbones and necks.

:func:`export_detector` writes a built detector as TorchScript (``tracing`` through detectron2's
``TracingAdapter``, or ``scripting`` through ``scripting_with_instances``: R-CNNs)
or ONNX (tracing, ``torch.onnx.export(dynamo=False)`` as detectron2's
``tools/deploy/export_model.py``), with the image height and width left dynamic. The returned
:class:`ExportedDetector` runs the saved file and the eager model on one image, so
:func:`max_difference` says how far they differ. Outputs, architectures, what works where and
why: docs/detectron2.md#deploying-detectors-scriptsexport_detectorpy-detectron2_extexportpy.
"""
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN, PanopticFPN, build_model
from detectron2.structures import Boxes

__all__ = [
    'FORMATS', 'METHODS', 'SCRIPTED_FIELDS', 'OutputFolderError', 'ExportedDetector',
    'check_output_dir', 'check_exportable', 'build_detector', 'load_sample', 'resize_sample',
    'second_size', 'export_detector', 'load_exported', 'max_difference',
]

FORMATS = ('torchscript', 'onnx')
METHODS = ('tracing', 'scripting')
# Instances fields a scripted detector may carry, with their types (detectron2's deploy list)
SCRIPTED_FIELDS = {
    'proposal_boxes': Boxes, 'objectness_logits': Tensor, 'pred_boxes': Boxes, 'scores': Tensor,
    'pred_classes': Tensor, 'pred_masks': Tensor, 'pred_keypoints': Tensor,
    'pred_keypoint_heatmaps': Tensor,
}


class OutputFolderError(FileExistsError):
    """The export folder exists and holds files: exports never overwrite another run's folder."""


def check_output_dir(path: str) -> None:
    """Refuse an existing, non-empty ``path`` with one line that says what to do."""
    if os.path.isdir(path) and os.listdir(path):
        raise OutputFolderError(
            f"Output folder '{path}' exists and is not empty; give a new or empty --output folder.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputFolderError(f"--output '{path}' is a file; give a folder path.")


def build_detector(config_file: str, weights: str = '', opts: Sequence[str] = ()):
    """``(cfg, model)``: :func:`detectron2_ext.config_file.load_config` (safe YAML) with ``opts``,
    ``build_model`` in eval mode, and ``weights`` (else ``MODEL.WEIGHTS``; none: as built) read
    by :class:`~detectron2_ext.checkpoint.SafeDetectionCheckpointer`."""
    from .checkpoint import SafeDetectionCheckpointer
    from .config_file import load_config
    cfg = load_config(config_file, opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    weights = weights or cfg.MODEL.WEIGHTS
    # detectron2's checkpointer would start from scratch on a missing file, with a log line only
    if weights and '://' not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"Weights '{weights}' are not a file; give a checkpoint path.")
    model = build_model(cfg).eval()
    if weights:
        SafeDetectionCheckpointer(model).load(weights)
    return cfg, model


def load_sample(cfg, image_path: str) -> Tensor:
    """The sample as the model's input ``(3, H, W)`` float tensor, resized as detectron2's
    ``DefaultPredictor`` does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``)."""
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"--sample-image '{image_path}' is not a file; give an image path.")
    image = detection_utils.read_image(image_path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.astype('float32').transpose(2, 0, 1)))


def resize_sample(image: Tensor, height: int, width: int) -> Tensor:
    """The sample at another size (bilinear): the second size an export is checked at."""
    return nn.functional.interpolate(image[None], size=(height, width), mode='bilinear',
                                     align_corners=False)[0]


def _flatten(outputs) -> List[Tensor]:
    """Tensors of a (nested) output in a fixed order: dict keys sorted, ``Boxes`` as tensors."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, Boxes):
        return [outputs.tensor]
    if isinstance(outputs, dict):
        return [t for k in sorted(outputs) for t in _flatten(outputs[k])]
    if isinstance(outputs, (list, tuple)):
        return [t for o in outputs for t in _flatten(o)]
    if hasattr(outputs, 'get_fields'):  # Instances
        return _flatten(outputs.get_fields())
    raise TypeError(f'cannot compare an output of type {type(outputs).__name__}')


def _inference_fn(model: nn.Module) -> Optional[Callable]:
    """How the deployed program calls the model: outputs before the final resize to the
    original image size (detectron2's tracing export), and before the panoptic merge, whose
    per-instance loop a trace would freeze."""
    if isinstance(model, PanopticFPN):
        def inference(m, inputs):
            instances, sem_seg = m.inference(inputs, do_postprocess=False)
            return [{'instances': instances[0], 'sem_seg': sem_seg[0]}]
        return inference
    if isinstance(model, GeneralizedRCNN):
        def inference(m, inputs):
            return [{'instances': m.inference(inputs, do_postprocess=False)[0]}]
        return inference
    return None  # SemanticSegmentor, RetinaNet: the model's own forward


class _ScriptableRCNN(nn.Module):
    """R-CNN inference returning plain dicts (a scripted ``Instances`` cannot leave TorchScript)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]

class ExportedDetector(NamedTuple):
    """An exported detector on disk, and how to run it and its eager original on one image."""
    path: str
    run: Callable[[Tensor], List[Tensor]]    # the exported program, flattened outputs
    eager: Callable[[Tensor], List[Tensor]]  # the eager model, same flattening


def _atomic_save(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into the same folder, fsync, rename: a failed export leaves no file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_exportable(model: nn.Module, fmt: str, method: str) -> None:
    """Refuse a format / method / architecture combination that has no export path."""
    if fmt not in FORMATS:
        raise ValueError(f'format {fmt!r}: choose one of {FORMATS}.')
    if method not in METHODS:
        raise ValueError(f'export method {method!r}: choose one of {METHODS}.')
    if method == 'scripting' and fmt != 'torchscript':
        raise ValueError('scripting exports TorchScript only; use --export-method tracing for ONNX.')
    if method == 'scripting' and (isinstance(model, PanopticFPN) or
                                  not isinstance(model, GeneralizedRCNN)):
        raise ValueError(
            f"scripting exports R-CNNs (Mask / Cascade Mask / Faster R-CNN); use "
            f"--export-method tracing for {type(model).__name__}.")


def export_detector(
        model: nn.Module,
        image: Tensor,
        output_dir: str,
        fmt: str = 'torchscript',
        method: str = 'tracing',
        opset: int = 17,
) -> ExportedDetector:
    """Export ``model`` (eval mode) into ``output_dir`` (created; refused if non-empty).

    Args:
        model: a detectron2 model built by ``build_model`` (see the module docstring).
        image: sample input ``(3, H, W)``, as :func:`load_sample` gives it; tracing records the
            program on it (the height and width stay dynamic).
        output_dir: folder for ``model.ts`` or ``model.onnx``.
        fmt: ``'torchscript'`` or ``'onnx'``.
        method: ``'tracing'`` or ``'scripting'`` (TorchScript only, as in detectron2).
        opset: ONNX opset (FINE's attention needs >= 14).
    """
    check_exportable(model, fmt, method)
    check_output_dir(output_dir)
    adapter = _adapter(model.eval(), image, method)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, _file_name(fmt))
    _write(adapter, image, path, fmt, method, opset)
    return load_exported(model, image, output_dir, fmt, method)


def _adapter(model: nn.Module, image: Tensor, method: str) -> nn.Module:
    """The module that is exported: detectron2's ``TracingAdapter`` (image in, flat tensors
    out) for tracing, a dict-returning wrapper for scripting."""
    if method == 'tracing':
        return TracingAdapter(model, [{'image': image}], _inference_fn(model)).eval()
    return _ScriptableRCNN(model).eval()


def _file_name(fmt: str) -> str:
    return 'model.onnx' if fmt == 'onnx' else 'model.ts'


def _write(adapter: nn.Module, image: Tensor, path: str, fmt: str, method: str,
           opset: int) -> None:
    if method == 'scripting':
        scripted = scripting_with_instances(adapter, SCRIPTED_FIELDS)
        _atomic_save(path, lambda p: torch.jit.save(scripted, p))
        return
    with torch.no_grad():
        if fmt == 'torchscript':
            # check_trace would run the model twice more; max_difference checks the saved file
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
            _atomic_save(path, lambda p: torch.jit.save(traced, p))
            return
        outputs = [f'output{i}' for i in range(len(adapter(image)))]
        _atomic_save(path, lambda p: torch.onnx.export(
            adapter, (image,), p, dynamo=False, opset_version=opset, input_names=['image'],
            output_names=outputs, dynamic_axes={'image': {1: 'height', 2: 'width'}}))


def load_exported(model: nn.Module, image: Tensor, output_dir: str, fmt: str = 'torchscript',
                  method: str = 'tracing') -> ExportedDetector:
    """An :class:`ExportedDetector` for the file :func:`export_detector` wrote into
    ``output_dir`` from ``model`` and the sample ``image`` (same arguments)."""
    path = os.path.join(output_dir, _file_name(fmt))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No exported model at '{path}'; run the export first.")
    adapter = _adapter(model.eval(), image, method)
    def call(module, x):
        return module([{'image': x}]) if method == 'scripting' else module(x)

    def eager(x: Tensor) -> List[Tensor]:
        with torch.no_grad():
            return _flatten(call(adapter, x))

    if fmt == 'onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])

        def run(x: Tensor) -> List[Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, {'image': x.numpy()})]
        return ExportedDetector(path, run, eager)
    loaded = torch.jit.load(path)

    def run(x: Tensor) -> List[Tensor]:
        with torch.no_grad():
            return _flatten(call(loaded, x))
    return ExportedDetector(path, run, eager)


def max_difference(exported: ExportedDetector, image: Tensor) -> float:
    """Largest absolute difference between the exported program's and the eager model's
    outputs on ``image``; ``inf`` when their shapes differ (e.g. another number of detections)."""
    got, want = exported.run(image), exported.eager(image)
    if len(got) != len(want):
        return float('inf')
    worst = 0.0
    for a, b in zip(got, want):
        if tuple(a.shape) != tuple(b.shape):
            return float('inf')
        if a.numel():
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    return worst


def second_size(image: Tensor) -> Tuple[int, int]:
    """A second check size: 3/4 of the sample's height and 5/6 of its width (another aspect
    ratio and, after detectron2's padding, another padded size than the traced one)."""
    h, w = image.shape[-2], image.shape[-1]
    return max(32, h * 3 // 4), max(32, w * 5 // 6)
