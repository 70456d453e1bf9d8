"""Model cards (``README.md`` of a Hub repo, ``hub_cards/``) generated from data: measured numbers
(``maformer_zoo.utils.flops.measure_model_stats``), the papers, and whether weights are published."""
import dataclasses
from typing import Any, Dict, Optional

from .hub import DEFAULT_TAG, hub_id

__all__ = ['WeightsInfo', 'model_card_info', 'render_model_card']


@dataclasses.dataclass
class WeightsInfo:
    """What a card says about the weights in its repo.

    Attributes:
        published: trained weights are in the repo.
        description: one line on where the weights come from (checkpoint, epochs, EMA...).
        results: measured evaluation numbers to list, e.g. {'ImageNet-1k top-1 (%)': 79.1}.
    """
    published: bool = False
    description: str = ''
    results: Dict[str, Any] = dataclasses.field(default_factory=dict)

# Papers. The texts in shared/papers state no arXiv ids; the ids and the MAFormer author list
# (its shared text is the double-blind submission) are those of the public arXiv records.
_PAPERS: Dict[str, Dict[str, str]] = {
    'maformer': dict(
        title='MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition',
        where='arXiv:2209.01620, 2022',
        bibtex=(
            '@article{wang2022maformer,\n'
            '  title={MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition},\n'
            '  author={Wang, Yunhao and Sun, Huixin and Wang, Xiaodi and Zhang, Bin and Li, Chao and '
            'Xin, Ying and Zhang, Baochang and Ding, Errui and Han, Shumin},\n'
            '  journal={arXiv preprint arXiv:2209.01620},\n'
            '  year={2022}\n'
            '}'),
    ),
    'mscsa': dict(
        title='Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention',
        where='arXiv:2308.05872, 2023',
        bibtex=(
            '@article{shang2023mscsa,\n'
            '  title={Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention},\n'
            '  author={Shang, Liang and Liu, Yanli and Lou, Zhengyang and Quan, Shuxue and '
            'Adluru, Nagesh and Guan, Bochen and Sethares, William A.},\n'
            '  journal={arXiv preprint arXiv:2308.05872},\n'
            '  year={2023}\n'
            '}'),
    ),
    # base architectures of the MSCSA models, as the MSCSA paper's references give them
    'resnet': dict(title='Deep Residual Learning for Image Recognition', where='CVPR 2016'),
    'pvt_v2': dict(title='PVT v2: Improved Baselines with Pyramid Vision Transformer',
                   where='Computational Visual Media 8(3), 2022'),
    'swin': dict(title='Swin Transformer: Hierarchical Vision Transformer using Shifted Windows',
                 where='ICCV 2021'),
    'convnext': dict(title='A ConvNet for the 2020s', where='CVPR 2022'),
}
# Official code of the base architectures, as footnoted in the MSCSA paper (none for ResNet).
_BASE_CODE = {
    'pvt_v2': 'https://github.com/whai362/PVT',
    'swin': 'https://github.com/microsoft/Swin-Transformer',
    'convnext': 'https://github.com/facebookresearch/ConvNeXt',
}
_DESCRIPTIONS = {
    'maformer': (
        "A MAFormer image classification model and multi-scale feature backbone: a dual-stream "
        "transformer with local window attention and Global Learning with Down-sampling (GLD), "
        "fused by Multi-scale Attention Fusion (MAF)."),
    'mscsa': (
        "timm's `{base}` with the Multi-Stage Cross-Scale Attention (MSCSA) add-on module, which "
        "attends across the feature maps of all stages, as an image classification model and "
        "multi-scale feature backbone."),
    'timm': "timm's `{model}`, exported with the maformer-zoo Hub tools.",
}


def model_card_info(model_name: str) -> Dict[str, Any]:
    """Family, base architecture, papers and original code of a registered model (card data)."""
    if model_name.startswith('maformer'):
        family, base, papers = 'maformer', None, ['maformer']
    elif model_name.endswith('_mscsa'):
        family, base = 'mscsa', model_name[:-len('_mscsa')]
        base_key = next((k for k in ('pvt_v2', 'swin', 'convnext', 'resnet') if base.startswith(k)), None)
        papers = ['mscsa'] + ([base_key] if base_key else [])
    else:
        family, base, papers = 'timm', None, []
    base_key = papers[1] if len(papers) > 1 else None
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    paper_list = [_PAPERS[p] for p in papers]
    if family == 'timm' and cfg is not None and (cfg.paper_name or cfg.paper_ids):
        # any other timm model exported with this machinery: what its pretrained cfg says
        paper_list = [dict(title=cfg.paper_name or str(cfg.paper_ids), where=str(cfg.paper_ids or ''))]
    return dict(
        family=family,
        base=base,
        papers=paper_list,
        citations=[_PAPERS[p]['bibtex'] for p in papers if 'bibtex' in _PAPERS[p]],
        original=None if family != 'timm' else (cfg.origin_url if cfg else None),
        base_code=_BASE_CODE.get(base_key),
        description=_DESCRIPTIONS[family].format(base=base, model=model_name),
        license=(cfg.license if cfg and cfg.license else 'apache-2.0'),
    )


_USAGE = '''### Image Classification
```python
from PIL import Image
import timm
import torch
import maformer_zoo  # registers the maformer-zoo models with timm

model = timm.create_model('{load_name}', pretrained=True)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    output = model(transforms(img).unsqueeze(0))  # (1, {num_classes}) logits
top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
```

### Feature Map Extraction
```python
from PIL import Image
import timm
import torch
import maformer_zoo

model = timm.create_model('{load_name}', pretrained=True, features_only=True)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    feature_maps = model(transforms(img).unsqueeze(0))
for reduction, o in zip(model.feature_info.reduction(), feature_maps):
    print(reduction, o.shape)  # strides 4, 8, 16, 32
```

### Image Embeddings
```python
from PIL import Image
import timm
import torch
import maformer_zoo

model = timm.create_model('{load_name}', pretrained=True, num_classes=0)  # remove the classifier
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    embedding = model(transforms(img).unsqueeze(0))  # (1, num_features) pooled embedding
    # or, without pooling:
    feature_map = model.forward_features(transforms(img).unsqueeze(0))
    embedding = model.forward_head(feature_map, pre_logits=True)
```

### Loading from a local folder or file (offline)
```python
import timm
import maformer_zoo

# a folder written by scripts/push_to_hub.py (model.safetensors + config.json)
model = timm.create_model('local-dir:/path/to/{model}.{tag}', pretrained=True)
# or a weight file
model = timm.create_model('{model}', pretrained=True,
                          pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'))
```
'''


def _weights_section(repo_id: str, weights: WeightsInfo) -> str:
    if not weights.published:
        text = (
            f"**Weights:** no trained weights are published for `{repo_id}` yet. The architecture is "
            f"complete and can be trained from scratch (`pretrained=False`); with "
            f"`pretrained=True` it loads weights you provide (an `hf-hub:` cache, a `local-dir:` "
            f"folder or a file, see Model Usage) and otherwise fails with an error that lists these "
            f"ways.")
        if weights.description:
            text += f" The weights in this folder were {weights.description}"
        return text + '\n'
    text = f"**Weights:** published in `{repo_id}`"
    text += f"; {weights.description}\n" if weights.description else '.\n'
    return text


def render_model_card(
        model_name: str,
        stats: Dict[str, Any],
        weights: Optional[WeightsInfo] = None,
        tag: str = DEFAULT_TAG,
        num_classes: int = 1000,
        repo_id: Optional[str] = None,
) -> str:
    """A timm-style model card (``README.md``) for ``model_name``, from data.

    Args:
        model_name: a registered maformer-zoo model.
        stats: ``measure_model_stats`` output (``params_m`` required; GMACs/activations optional).
        weights: what the card says about the weights (default: nothing published).
        tag: pretrained tag of the repo id.
        num_classes: classes of the head the card's repo holds.
        repo_id: the repo the card is for (default ``maformer-zoo/<name>.<tag>``).
    """
    info = model_card_info(model_name)
    weights = weights or WeightsInfo()
    repo_id = repo_id or hub_id(model_name, tag)
    lines = [
        '---',
        'tags:',
        '- image-classification',
        '- timm',
        '- maformer-zoo',
    ] + ([f'- {info["family"]}'] if info['family'] != 'timm' else []) + [
        'library_name: timm',
        f'license: {info["license"]}',
        'datasets:',
        '- imagenet-1k',
        'pipeline_tag: image-classification',
        '---',
        f'# Model card for {model_name}.{tag}',
        '',
        info['description'],
        '',
        _weights_section(repo_id, weights),
        '## Model Details',
        '- **Model Type:** Image classification / feature backbone',
        '- **Model Stats:**',
        f'  - Params (M): {stats["params_m"]:.2f}',
    ]
    if stats.get('gmacs') is not None:
        lines.append(f'  - GMACs: {stats["gmacs"]:.2f}')
    if stats.get('macts') is not None:
        lines.append(f'  - Activations (M): {stats["macts"]:.2f}')
    if stats.get('gmacs') is None:
        lines.append('  - GMACs / Activations (M): not measured for this export (see hub_cards/)')
    if stats.get('img_size'):
        height, width = stats['img_size']
        lines.append(f'  - Image size: {height} x {width}')
    lines.append('  - Counted with fvcore as timm does (batch of 1, MACs; fused attention counted as unfused)')
    lines.append('- **Papers:**')
    lines += [f'  - {p["title"]} ({p["where"]})' for p in info['papers']]
    if info['original']:
        lines.append(f'- **Original:** {info["original"]}')
    else:
        lines.append('- **Original:** none; the paper links no official code. Implementation: maformer-zoo')
    if info['base_code']:
        lines.append(f'- **Base architecture code:** {info["base_code"]}')
    lines.append('- **Dataset:** ImageNet-1k' + ('' if weights.published else ' (intended; no weights yet)'))
    lines.append(f'- **Classes:** {num_classes}')
    lines.append(f'- **Hub id:** `{repo_id}`')
    for name, value in weights.results.items():
        lines.append(f'- **{name}:** {value}')
    # the registry name loads the default repo with the default head; any other repo by its id
    from timm.models import get_pretrained_cfg
    default_cfg = get_pretrained_cfg(f'{model_name}.{tag}')
    by_name = repo_id == hub_id(model_name, tag) and default_cfg is not None and \
        default_cfg.num_classes == num_classes
    load_name = f'{model_name}.{tag}' if by_name else f'hf-hub:{repo_id}'
    lines += ['', '## Model Usage', _USAGE.format(
        model=model_name, load_name=load_name, tag=tag, num_classes=num_classes)]
    lines.append('## Citation')
    for bibtex in info['citations']:
        lines += ['```bibtex', bibtex, '```']
    return '\n'.join(lines) + '\n'
