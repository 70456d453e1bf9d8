"""The timm model contract, checked for every model of the zoo (``maformer_zoo.list_models()``).

What timm checks of its own families: forward/backward, default cfgs, classifier handling,
features and intermediates, TorchScript, FX, torch.compile, torch.export and ONNX. The models are
built with one block per stage (``_small``, plus a shifted-window block where a family has one) and run on small inputs, so the whole suite stays
fast; the full-depth models differ only in how many identical blocks they repeat. What pins the
papers (params, FLOPs, layers) lives in test_maformer.py and test_mscsa.py.
"""
import math
import warnings

import onnxruntime
import pytest
import timm
import torch
from timm.layers import set_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._features_fx import create_feature_extractor, get_graph_node_names
from torchvision.models.feature_extraction import create_feature_extractor as tv_feature_extractor
from torchvision.models.feature_extraction import get_graph_node_names as tv_graph_node_names

import maformer_zoo

MODELS = maformer_zoo.list_models()
# the shallowest base of each MSCSA family, one block per stage of the base; Swin keeps a second
# (shifted-window) block in stage 2, MAFormer one in stage 3, so the shifted-window code is covered
_BASE_SMALL = {
    'resnet': dict(layers=(1, 1, 1, 1)),
    'pvt_v2': dict(depths=(1, 1, 1, 1)),
    'swin': dict(depths=(1, 2, 1, 1)),
    'convnext': dict(depths=(1, 1, 1, 1)),
}
INPUT = (2, 3, 64, 96)  # two images, not square, every side a multiple of 32


# the papers' models: MAFormer Table 1, MSCSA Table 6
PAPER_MODELS = ('maformer_s', 'maformer_b', 'maformer_l', 'resnet18_mscsa', 'resnet50_mscsa',
                'pvt_v2_b0_mscsa', 'pvt_v2_b1_mscsa', 'pvt_v2_b2_mscsa',
                'swin_tiny_patch4_window7_224_mscsa', 'convnext_tiny_mscsa')


def test_zoo_registers_the_ten_paper_models():
    """The one registration check: ``import maformer_zoo`` registers exactly the papers' ten
    models in timm, and ``maformer_zoo.list_models()`` lists them (that the import replaces none of
    timm's own models and imports no detectron2: test_foundation.py)."""
    assert sorted(MODELS) == sorted(PAPER_MODELS)
    assert all(timm.is_model(n) for n in MODELS)
    assert sorted(timm.list_models('*_mscsa')) == sorted(n for n in MODELS if n.endswith('_mscsa'))
    assert sorted(timm.list_models('maformer_*')) == sorted(n for n in MODELS if n.startswith('maformer'))


def _small_kwargs(name: str) -> dict:
    if name.startswith('maformer'):
        return dict(depths=(1, 1, 2, 1))
    family = next(f for f in _BASE_SMALL if name.startswith(f))
    return dict(base_kwargs=dict(_BASE_SMALL[family]))


def _small(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(_small_kwargs(name), **kwargs))


def _input(shape=INPUT, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_close(a, e, atol, rtol)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- forward/backward

@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_parameter_acts(name):
    """Train mode: every parameter gets a finite gradient. Eval mode, float64 (round-off ~1e-16 of a
    gradient): no parameter's gradient stays below 1e-9 of the largest one, i.e. every parameter can
    change the output (a bias that a following LayerNorm removes fails here).

    Parameters are first moved off their initial values: zero-initialised residual gains (timm's
    ResNet ``zero_init_last``, ConvNeXt's layer scale) block gradients at init only. Eval mode,
    because in train mode BatchNorm also removes per-channel constants (docs/mscsa.md, "Biases
    before BatchNorm").
    """
    model = _small(name).double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    x = _input(dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        model.zero_grad(set_to_none=True)
        out = model(x)
        assert out.shape == (INPUT[0], model.num_classes) and torch.isfinite(out).all()
        (out * _input(out.shape, seed=2, dtype=torch.float64)).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing
    scale = {n: p.grad.abs().max().item() for n, p in model.named_parameters()}
    largest = max(scale.values())
    dead = {n: g / largest for n, g in scale.items() if g < 1e-9 * largest}
    assert not dead, dead


# ---------------------------------------------------------------------------------- default cfg

@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_matches_the_model(name):
    model = _small(name).eval()
    cfg = model.pretrained_cfg
    in_chans, height, width = cfg['input_size']
    assert cfg['num_classes'] == model.num_classes == 1000
    first_conv = model.get_submodule(cfg['first_conv'])
    assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == in_chans
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == cfg['num_classes']
    assert classifier.in_features == model.num_features == model.head_hidden_size
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, in_chans, height, width))
    assert tuple(feats.shape[-2:]) == tuple(cfg['pool_size'])
    assert cfg['mean'] and cfg['std'] and len(cfg['mean']) == in_chans
    # the papers' ImageNet setting (MAFormer Sec. 4.1, MSCSA Appendix C.1): 224 px, 1000 classes,
    # ImageNet mean/std; no weights published yet, so no hub id (docs/weights.md)
    assert cfg['input_size'] == (3, 224, 224)
    assert tuple(cfg['mean']) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(cfg['std']) == timm.data.IMAGENET_DEFAULT_STD
    assert 0.8 <= cfg['crop_pct'] <= 1.0
    assert not cfg.get('hf_hub_id'), cfg.get('hf_hub_id')


# ---------------------------------------------------------------------------------- classifier

@pytest.mark.parametrize('name', MODELS)
def test_classifier_reset_pool_and_pre_logits(name):
    model = _small(name).eval()
    x = _input()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[:2] == (INPUT[0], model.num_features) and feats.ndim == 4
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (INPUT[0], model.num_features)
        _assert_close(model.get_classifier()(pre), model(x))

        model.reset_classifier(7)
        assert model(x).shape == (INPUT[0], 7) and model.num_classes == 7
        model.reset_classifier(0)
        _assert_close(model(x), pre)
        model.reset_classifier(0, global_pool='')
        _assert_close(model(x), feats)

    no_head = _small(name, num_classes=0).eval()
    with torch.no_grad():
        assert no_head(x).shape == (INPUT[0], no_head.num_features)
    unpooled = _small(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert unpooled(x).shape == feats.shape


# -------------------------------------------------------------------- features and intermediates

@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 3), (2,)])
def test_forward_intermediates_equal_features_only(name, out_indices):
    dense = {} if name.startswith('maformer') else dict(dense_fusion=True)
    model = _small(name, **dense).eval()
    features = _small(name, features_only=True, out_indices=out_indices).eval()
    x = _input()
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
        final, with_final = model.forward_intermediates(x, indices=list(out_indices))
        got = features(x)
    _assert_close(got, expected)
    _assert_close(with_final, expected)
    assert [t.shape[1] for t in got] == features.feature_info.channels()
    assert [INPUT[-1] // t.shape[-1] for t in got] == features.feature_info.reduction()
    assert final.shape[1] == model.num_features


@pytest.mark.parametrize('name', MODELS)
def test_prune_intermediate_layers_keeps_the_intermediates(name):
    """``prune_intermediate_layers`` (timm's ``features_only`` route) drops the head, the final
    norm and what the kept intermediates do not need (MAFormer's later stages, MSCSA's unused
    fusion layers), and the kept intermediates stay bit-identical."""
    dense = {} if name.startswith('maformer') else dict(dense_fusion=True)
    model = _small(name, **dense).eval()
    x = _input()
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert model.num_classes == 0 and sum(p.numel() for p in model.parameters()) < before
    if name.startswith('maformer'):
        assert len(model.stages) == 2 and isinstance(model.norm, torch.nn.Identity)
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    _assert_close(pruned, full, atol=0, rtol=0)


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_options(name):
    model = _small(name).eval()
    x = _input()
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NLC')
    with torch.no_grad():
        nchw = model.forward_intermediates(x, indices=2, intermediates_only=True)
        nhwc = model.forward_intermediates(x, indices=2, output_fmt='NHWC', intermediates_only=True)
        _assert_close([t.permute(0, 3, 1, 2) for t in nhwc], nchw)
        # stop_early returns the same intermediates, up to the deepest one taken
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        _assert_close(early, model.forward_intermediates(x, indices=[0, 1], intermediates_only=True))
        final, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert final.shape[1] == model.feature_info[1]['num_chs']
        if name.startswith('maformer'):
            last = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
            _assert_close(last, model.forward_features(x))
        else:
            with pytest.raises(ValueError, match='norm=False'):
                model.forward_intermediates(x, norm=True)


# ------------------------------------------------------------------------- training behaviour

_ALL_DROPS = dict(drop_path_rate=0.2, drop_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3)


def _randomise_batchnorms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode is no identity."""
    generator = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
            if m.affine:
                m.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.data.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)


@pytest.mark.parametrize('name', MODELS)
def test_eval_is_deterministic_and_batch_independent(name):
    """In eval mode every dropout, attention dropout and drop path is off: the output equals, bit
    for bit, that of the same weights built with all rates 0 (an independent model, not a second
    call), and one image alone gives its row of the batch (BatchNorm uses its statistics).

    Mutations caught (dev/mutations.py): ``maformer-attn-dropout-in-eval`` (maformer_*),
    ``mscsa-attn-dropout-in-eval`` (*_mscsa).
    """
    model = _small(name, **_ALL_DROPS).eval()
    with torch.no_grad():
        _randomise_batchnorms(model)
    plain = _small(name).eval()
    plain.load_state_dict(model.state_dict())
    x = _input((3, 3, 64, 64))
    with torch.no_grad():
        out, reference, single = model(x), plain(x), model(x[1:2])
    assert torch.equal(out, reference)
    torch.testing.assert_close(single, out[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_gives_the_same_output_and_gradients(name):
    """``set_grad_checkpointing(True)`` (timm's memory saver, recomputing activations in backward)
    changes nothing but memory: in training mode the output is bit-identical and every parameter's
    gradient equals the plain run's (round-off of the recomputation only); every parameter gets one.

    Mutation caught (dev/mutations.py): ``mscsa-checkpoint-detached`` (*_mscsa).
    """
    x = _input((2, 3, 64, 80))
    runs = []
    for enable in (False, True):
        model = _small(name).train()
        model.set_grad_checkpointing(enable)
        out = model(x)
        (out * _input(out.shape, seed=2)).sum().backward()
        runs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_out, plain_grads), (ckpt_out, ckpt_grads) = runs
    assert torch.equal(plain_out, ckpt_out)
    missing = [n for n, g in ckpt_grads.items() if g is None]
    assert not missing, missing
    for n, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[n], grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize('name', MODELS)
def test_group_matcher_and_no_weight_decay(name):
    """timm's parameter grouping (layer-wise learning-rate decay, our detectron2 adapter's
    FREEZE_AT): the fine and the coarse matcher each put every parameter in one group, the stem
    (``first_conv``) in the first and the classifier in the last; ``no_weight_decay()`` names
    parameters of the model, and timm's optimizer factory (with layer decay) gives them none.
    What each family puts in its groups: test_maformer.py, test_mscsa.py."""
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2
    model = _small(name)
    params = dict(model.named_parameters())
    cfg = model.pretrained_cfg
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sorted(n for names in groups.values() for n in names) == sorted(params)
        assert cfg['first_conv'] + '.weight' in groups[min(groups)], coarse
        assert cfg['classifier'] + '.weight' in groups[max(groups)], coarse
    no_decay_names = model.no_weight_decay()
    assert set(no_decay_names) <= set(params)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert all(id(params[n]) in no_decay for n in no_decay_names)
    assert id(params[cfg['classifier'] + '.weight']) not in no_decay


# -------------------------------------------------------------------------------- deploy paths

@pytest.mark.parametrize('name', MODELS)
def test_torchscript_equals_eager(name):
    with set_scriptable(True):
        model = _small(name).eval()
        scripted = torch.jit.script(model)
    x = _input()
    with torch.no_grad():
        _assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_features_only_equals_eager(name):
    """``features_only`` scripts too (timm's getter wrapper compiles our ``forward_intermediates``).
    Mutation: an f-string in its ``output_fmt`` error, or MSCSA's stage count read from a module
    global, fails to compile."""
    with set_scriptable(True):
        model = _small(name, features_only=True).eval()
        scripted = torch.jit.script(model)
    x = _input()
    with torch.no_grad():
        _assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', MODELS)
def test_fx_equals_eager(name):
    """The model traced by timm's FX machinery, and ``features_only`` with ``feature_cls='fx'``."""
    model = _small(name).eval()
    graph = create_feature_extractor(model, return_nodes={get_graph_node_names(model)[1][-1]: 'out'})
    fx_features = _small(name, features_only=True, feature_cls='fx').eval()
    getter_features = _small(name, features_only=True).eval()
    x = _input()
    with torch.no_grad():
        _assert_close(graph(x)['out'], model(x))
        _assert_close(fx_features(x), getter_features(x))


# timm's own tests/test_models.py FX and TorchScript checks, the same things the same way: the
# model at timm's test size (the default input size capped at 128 per side, as our cfgs allow any
# size), FX through torchvision's feature extractor with timm's notrace modules and functions as
# leaves. Small models in the fast suite, the full-depth models in the slow one.
DEPTHS = ['small', pytest.param('full', marks=pytest.mark.slow)]
_TIMM_TEST_SIDE = 128


def _model_at(name: str, depth: str, **kwargs):
    if depth == 'small':
        return _small(name, **kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _timm_test_input(model, batch_size: int) -> torch.Tensor:
    cfg = model.pretrained_cfg
    assert not cfg.get('fixed_input_size') and not cfg.get('min_input_size')
    size = tuple(min(s, _TIMM_TEST_SIDE) for s in cfg['input_size'])
    return _input((batch_size,) + size, seed=5)


def _timm_fx_model(model):
    """The model as a torchvision FX feature extractor returning its output node in both modes
    (our models have one output, so the last node of each mode's graph is it)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = tv_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return tv_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('depth', DEPTHS)
@pytest.mark.parametrize('name', MODELS)
def test_timm_forward_fx(name, depth):
    """timm's ``test_model_forward_fx``: the traced model's output is exactly the eager output.
    Mutations: Swin-MSCSA traced through timm's dynamic mask (item assignment on a Proxy) fails;
    ``swin_shift_mask`` returning zeros (no mask) differs from eager by 8e-3."""
    model = _model_at(name, depth).eval()
    x = _timm_test_input(model, 1)
    with torch.inference_mode():
        expected = model(x)
        (got,) = _timm_fx_model(model)(x).values()
    assert torch.equal(got, expected)


@pytest.mark.parametrize('depth', DEPTHS)
@pytest.mark.parametrize('name', MODELS)
def test_timm_backward_fx(name, depth):
    """timm's ``test_model_backward_fx``: the training-mode graph (42 classes, batch 2) gives every
    parameter a gradient, and the output is finite."""
    model = _model_at(name, depth, num_classes=42).train()
    fx_model = _timm_fx_model(model)
    (out,) = fx_model(_timm_test_input(model, 2)).values()
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert sum(p.grad.numel() for p in fx_model.parameters()) == sum(p.numel() for p in model.parameters())
    assert out.shape == (2, 42) and torch.isfinite(out).all()


@pytest.mark.parametrize('depth', DEPTHS)
@pytest.mark.parametrize('name', MODELS)
def test_timm_forward_fx_torchscript(name, depth):
    """timm's ``test_model_forward_fx_torchscript``: the FX graph of the scriptable model scripts;
    here it must also equal eager. Mutation: a notrace helper that TorchScript cannot compile
    (e.g. an f-string in ``swin_shift_mask``) fails."""
    with set_scriptable(True):
        model = _model_at(name, depth).eval()
    scripted = torch.jit.script(_timm_fx_model(model))
    x = _timm_test_input(model, 1)
    with torch.inference_mode():
        (got,) = scripted(x).values()
        _assert_close(got, model(x))


@pytest.mark.parametrize('depth', DEPTHS)
@pytest.mark.parametrize('name', MODELS)
def test_timm_forward_torchscript(name, depth):
    """timm's ``test_model_forward_torchscript`` (scripted with ``set_scriptable``), equal to eager."""
    with set_scriptable(True):
        model = _model_at(name, depth).eval()
    scripted = torch.jit.script(model)
    x = _timm_test_input(model, 1)
    with torch.no_grad():
        _assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', MODELS)
def test_compile_fullgraph(name):
    """``torch.compile(fullgraph=True)`` captures the whole model in one graph (no graph break)."""
    torch._dynamo.reset()
    model = _small(name).eval()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = _input()
    with torch.no_grad():
        _assert_close(compiled(x), model(x))


# Detection sizes: every multiple of 32 from 512 to 2048 on each side.
DETECTION_SIDES = range(512, 2049, 32)
# the sizes at which the exported program is compared with eager: square, the most common
# detection aspect ratio, and the longest side against the shortest
COMPARE_SIZES = ((512, 512), (640, 1024), (2048, 544))


def export_detection_sizes(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The documented call (docs/maformer.md, "Deploy paths per model"): ``32 * Dim(16..64)`` per
    side, no torch setting and no function mode."""
    h, w = torch.export.Dim('h', min=16, max=64), torch.export.Dim('w', min=16, max=64)
    return torch.export.export(model, (example,), dynamic_shapes=({2: 32 * h, 3: 32 * w},))


def _probe_sizes() -> list:
    """Every side length against the smallest and largest other side, and the diagonal (331 sizes)."""
    sizes = {(a, b) for a in DETECTION_SIDES for b in (512, 544, 2048)}
    return sorted(sizes | {(b, a) for a, b in sizes} | {(a, a) for a in DETECTION_SIDES})


def _sizes_refused(program: torch.export.ExportedProgram) -> list:
    """The probe sizes the program's input guards refuse. The guards (torch's ``_guards_fn``, run
    first by the program's module) read only sizes, so meta tensors check them without computing."""
    guards = program.module()._guards_fn
    refused = []
    for size in _probe_sizes():
        try:
            guards(torch.empty(1, 3, *size, device='meta'))
        except AssertionError:
            refused.append(size)
    return refused


def _check_detection_export(model: torch.nn.Module, example_size: tuple) -> None:
    program = export_detection_sizes(model, _input((1, 3) + tuple(example_size)))
    assert _sizes_refused(program) == []
    for size in COMPARE_SIZES:
        x = _input((1, 3) + size, seed=3)
        with torch.no_grad():
            _assert_close(program.module()(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name', MODELS)
def test_export_features_dynamic_detection_sizes(name):
    """One program from the plain call for every multiple of 32 from 512 to 2048 (guards checked at
    331 sizes on the meta device), equal to eager at ``COMPARE_SIZES``.

    Mutations: MAFormer's window crop as a slice + ``clone`` makes the program refuse 127 probed
    sizes (e.g. 512x800); a slice + ``contiguous()`` crop in the Swin-MSCSA traced path (timm's)
    refuses the sizes whose window padding differs from the example's."""
    model = _small(name, features_only=True).eval()
    _check_detection_export(model, (512, 576))


@pytest.mark.parametrize('name', MODELS)
def test_onnx_runs_in_onnxruntime(name, tmp_path):
    model = _small(name).eval()
    x = _input()
    path = tmp_path / f'{name}.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        _assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------- heavier duplicates

@pytest.mark.slow
@pytest.mark.parametrize('name', ['maformer_s', 'resnet50_mscsa', 'swin_tiny_patch4_window7_224_mscsa'])
def test_full_depth_export_and_inductor(name):
    """The full-depth models: the plain dynamic export at detection sizes and an inductor build."""
    model = timm.create_model(name, features_only=True).eval()
    _check_detection_export(model, (800, 1216))
    torch._dynamo.reset()
    classifier = timm.create_model(name).eval()
    compiled = torch.compile(classifier, fullgraph=True)
    x = _input((2, 3, 224, 224))
    with torch.no_grad():
        _assert_close(compiled(x), classifier(x), atol=1e-4, rtol=1e-4)
    assert math.isfinite(float(compiled(x).sum()))
