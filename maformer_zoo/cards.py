"""Model cards (``hub_cards/``, a Hub repo's ``README.md``): the input of timm's ``generate_readme``, plus our
weight status, usage code and citations. Hub repos are ``maformer-zoo/<name>.<tag>``; docs/weights.md."""
from typing import Any, Dict, Optional

from timm.models import get_pretrained_cfg
from timm.models._hub import generate_readme

HUB_ORG = 'maformer-zoo'
_CITATIONS = {  # the MAFormer author list is the public arXiv record's (the shared text is the blind submission)
    'maformer': '@article{wang2022maformer,\n  title={MAFormer: A Transformer Network with Multi-scale Attention '
                'Fusion for Visual Recognition},\n  author={Wang, Yunhao and Sun, Huixin and Wang, Xiaodi and Zhang, '
                'Bin and Li, Chao and Xin, Ying and Zhang, Baochang and Ding, Errui and Han, Shumin},\n  journal='
                '{arXiv preprint arXiv:2209.01620},\n  year={2022}\n}',
    'mscsa': '@article{shang2023mscsa,\n  title={Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention},'
             '\n  author={Shang, Liang and Liu, Yanli and Lou, Zhengyang and Quan, Shuxue and Adluru, Nagesh and Guan, '
             'Bochen and Sethares, William A.},\n  journal={arXiv preprint arXiv:2308.05872},\n  year={2023}\n}'}
# The MSCSA models' base architectures as the MSCSA paper cites them, and their code as it footnotes it.
_BASES = {'resnet': ('Deep Residual Learning for Image Recognition (CVPR 2016)', ''),
          'pvt_v2': ('PVT v2: Improved Baselines with Pyramid Vision Transformer (CVM 8(3), 2022)',
                     '; base code: https://github.com/whai362/PVT'),
          'swin': ('Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (ICCV 2021)',
                   '; base code: https://github.com/microsoft/Swin-Transformer'),
          'convnext': ('A ConvNet for the 2020s (CVPR 2022)',
                       '; base code: https://github.com/facebookresearch/ConvNeXt')}
_SNIPPET = '''### {title}
```python
from PIL import Image
import timm
import torch
import maformer_zoo  # registers the maformer-zoo models with timm

model = timm.create_model('hf-hub:{repo_id}', pretrained=True{args}).eval()
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
x = transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0)
with torch.no_grad():
{body}
```

'''
_USES = (('Image Classification', '', '    top5_probabilities, top5_class_indices = torch.topk(model(x).softmax(dim=1) '
                                      '* 100, k=5)  # {num_classes} classes'),
         ('Feature Map Extraction', ', features_only=True',
          '    for reduction, o in zip(model.feature_info.reduction(), model(x)):\n'
          '        print(reduction, o.shape)  # strides 4-32'),
         ('Image Embeddings', ', num_classes=0', '    embedding = model(x)  # (1, num_features); unpooled: '
                                                 'model.forward_features(x)'))
_LOCAL = '''### Loading from a local folder or file (offline)
```python
import timm
import maformer_zoo

model = timm.create_model('local-dir:/path/to/{name}.{tag}', pretrained=True)  # a scripts/push_to_hub.py folder
model = timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'))
```'''


def hub_id(model_name: str, tag: str = 'in1k') -> str:
    """The Hub repo of a model's weights, published or not."""
    return f'{HUB_ORG}/{model_name}.{tag}'


def describe_checkpoint(source: str, checkpoint: Any, key: str) -> str:
    """One sentence on where exported weights come from, from what the checkpoint records."""
    ema, record = 'ema' in key, checkpoint if isinstance(checkpoint, dict) else {}
    parts = [f'exported from `{source}`'] + ([f"entry `{key}`" + (' (EMA weights)' if ema else '')] if key else [])
    if isinstance(record.get('epoch'), int):
        parts.append(f"saved after epoch {record['epoch']}")
    metrics = record['metrics'] if isinstance(record.get('metrics'), dict) else {}  # maformer_zoo.training's
    chosen = metrics.get('ema' if ema else 'eval') or {}
    numbers = [f'{n} {chosen[n]:.2f}' for n in ('top1', 'top5') if isinstance(chosen.get(n), (int, float))]
    if numbers:
        parts.append("the training run's validation of these weights: " + ', '.join(numbers))
    elif isinstance(record.get('metric'), (int, float)):  # timm train.py
        parts.append(f"training script's eval metric {record['metric']:.4g}")
    return '; '.join(parts) + '.'


def model_card(model_name: str, stats: Dict[str, Any], tag: str = 'in1k', num_classes: int = 1000,
               repo_id: Optional[str] = None, published: Optional[bool] = None, about: str = '',
               results: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``generate_readme``'s input for ``model_name``: ``stats`` from ``measure_model_stats`` (``params_m`` at
    least); ``published`` defaults to timm's convention (the pretrained cfg names an ``hf_hub_id``); ``about``:
    where the weights come from; ``results``: measured numbers to list."""
    cfg = get_pretrained_cfg(model_name)  # the default tag's: paper, license, hf_hub_id
    repo_id = repo_id or hub_id(model_name, tag)
    base = model_name[:-len('_mscsa')] if model_name.endswith('_mscsa') else ''
    family = 'mscsa' if base else 'maformer'
    base_paper, base_code = next((v for k, v in _BASES.items() if base.startswith(k)), None) or ('', '')
    if cfg.hf_hub_id if published is None else published:
        status = f'published in `{repo_id}`' + (f'; {about}' if about else '.')
    else:
        status = (f"no trained weights are published for `{repo_id}` yet: train it (`pretrained=False`), or load "
                  f"weights you have with `pretrained=True` (an `hf-hub:` cache, a `local-dir:` folder or a file, see "
                  f"Model Usage)." + (f' The weights in this folder were {about}' if about else ''))
    numbers = {label: f'{stats[key]:.2f}' for label, key in (
        ('Params (M)', 'params_m'), ('GMACs', 'gmacs'), ('Activations (M)', 'macts')) if stats.get(key) is not None}
    if stats.get('img_size'):
        numbers['Image size'] = ' x '.join(map(str, stats['img_size']))
    details = {'Model Type': 'Image classification / feature backbone',
               'Model Stats (fvcore as timm counts them: batch 1, MACs, fused attention as unfused)': numbers,
               'Papers': [f'{cfg.paper_name} ({cfg.paper_ids})'] + ([base_paper] if base_paper else []),
               'Original': f'none; the paper links no official code. Implementation: maformer-zoo{base_code}',
               'Dataset': 'ImageNet-1k', 'Classes': num_classes, 'Hub id': f'`{repo_id}`', **(results or {})}
    about_model = (f"timm's `{base}` with the Multi-Stage Cross-Scale Attention (MSCSA) module, which attends across "
                   "the feature maps of all stages, as an image classifier and multi-scale feature backbone." if base
                   else "A MAFormer image classifier and multi-scale feature backbone: a dual-stream transformer with "
                   "local window attention and Global Learning with Down-sampling, fused by Multi-scale Attention "
                   "Fusion.")
    usage = ''.join(_SNIPPET.format(title=title, repo_id=repo_id, args=args, body=body.format(num_classes=num_classes))
                    for title, args, body in _USES) + _LOCAL.format(name=model_name, tag=tag)
    return dict(tags=['image-classification', 'timm', HUB_ORG, family], license=cfg.license, details=details,
                description=f'{about_model}\n\n**Weights:** {status}', usage=usage,
                citation=[_CITATIONS[family]])


def render_model_card(model_name: str, stats: Dict[str, Any], tag: str = 'in1k', **kwargs: Any) -> str:
    """The ``README.md`` of ``model_name``'s repo: timm's ``generate_readme`` of :func:`model_card`."""
    return generate_readme(model_card(model_name, stats, tag, **kwargs), f'{model_name}.{tag}')
