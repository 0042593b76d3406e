"""Any timm architecture: one per timm model family, split into layer groups the strategies can use.

For every installed family (a module of ``timm.models``), on the meta device (shapes only,
so even the 400M-parameter ones cost a fraction of a second): group names are unique, the
groups cover every parameter once, follow the forward pass from input to output, and end in
``head``, which holds exactly the new classifier (the parameters whose shape follows
``num_outputs``, found with a twin built for another class count). A curated sample of tiny
variants, one per family, also runs forward and backward with real numbers and takes a
head-only (linear-probe) step that must change the head and nothing else. Only feature
encoders (``*_enc``: no classifier) are refused, each with a one-line TunelabError.
"""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn
from torch.overrides import TorchFunctionMode

from tunelab.adapters.timm import timm_adapter, timm_groups
from tunelab.engine.strategies import linear_probe
from tunelab.errors import TunelabError

NUM = 5  # outputs of the new head; the twin that finds the class-dependent parameters uses NUM + 4
ENCODERS = re.compile(r".*_enc$")  # timm's feature encoders: no classifier, so nothing to replace

# One tiny variant per family that runs forward and backward on CPU in about a second:
# module -> (architecture, input size, kwargs that shrink it without changing its kind).
TRAINED: dict[str, tuple[str, int, dict]] = {
    "beit": ("beit_base_patch16_224", 32, {"depth": 2}),
    "byobnet": ("test_byobnet", 32, {}),
    "cait": ("cait_xxs24_224", 32, {"depth": 2}),
    "coat": ("coat_lite_tiny", 32, {}),
    "convit": ("convit_tiny", 32, {}),
    "convnext": ("convnext_atto", 32, {}),
    "cpubone": ("cpubone_nano", 32, {}),
    "crossvit": ("crossvit_tiny_240", 240, {}),  # two patch sizes: only its own size lines up
    "cspnet": ("cs3darknet_focus_s", 32, {}),
    "davit": ("davit_tiny", 32, {}),
    "deit": ("deit_tiny_distilled_patch16_224", 32, {}),  # head + head_dist
    "dla": ("dla46x_c", 32, {}),  # 1x1 convolution classifier
    "edgenext": ("edgenext_xx_small", 32, {}),
    "efficientformer": ("efficientformer_l1", 224, {}),  # tuple classifier, fixed 7x7 attention
    "efficientformer_v2": ("efficientformerv2_s0", 32, {}),
    "efficientnet": ("test_efficientnet", 32, {}),
    "efficientvit_mit": ("efficientvit_b0", 32, {}),
    "efficientvit_msra": ("efficientvit_m0", 32, {}),
    "eva": ("eva02_tiny_patch14_224", 28, {}),
    "fastvit": ("fastvit_t8", 32, {}),
    "gcvit": ("gcvit_xxtiny", 32, {}),
    "ghostnet": ("ghostnet_050", 32, {}),
    "hgnet": ("hgnetv2_b0", 32, {}),
    "hiera": ("hiera_tiny_224", 32, {}),  # head.norm before head.fc
    "hrnet": ("hrnet_w18_small", 32, {}),
    "inception_next": ("inception_next_atto", 32, {}),
    "levit": ("levit_128s", 32, {}),  # distilled pair of BatchNorm + linear heads
    "mambaout": ("mambaout_femto", 32, {}),
    "maxxvit": ("test_maxvit", 32, {}),
    "metaformer": ("poolformer_s12", 32, {}),  # no group_matcher
    "mlp_mixer": ("mixer_s32_224", 32, {}),
    "mobilenetv3": ("mobilenetv3_small_050", 32, {}),
    "mvitv2": ("mvitv2_tiny", 32, {}),
    "nest": ("nest_tiny", 32, {}),
    "nfnet": ("nf_regnet_b0", 32, {}),
    "pit": ("pit_ti_distilled_224", 32, {}),  # no group_matcher, distilled
    "pvt_v2": ("pvt_v2_b0", 32, {}),
    "rdnet": ("rdnet_tiny", 32, {}),  # group_matcher refuses coarse groups
    "regnet": ("regnetx_002", 32, {}),
    "repvit": ("repvit_m0_9", 32, {}),
    "resnest": ("resnest14d", 32, {}),
    "resnet": ("resnet18", 32, {}),
    "resnetv2": ("resnetv2_18", 32, {}),
    "rexnet": ("rexnet_100", 32, {}),
    "selecsls": ("selecsls42", 32, {}),  # a backbone module named `head` before the fc
    "senet": ("legacy_seresnet18", 32, {}),
    "sequencer": ("sequencer2d_s", 32, {}),
    "shvit": ("shvit_s1", 32, {}),
    "sknet": ("skresnet18", 32, {}),
    "starnet": ("starnet_s050", 32, {}),
    "swiftformer": ("swiftformer_xs", 32, {}),
    "swin_transformer": ("swin_tiny_patch4_window7_224", 32, {}),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", 32, {}),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", 32, {}),
    "tiny_vit": ("tiny_vit_5m_224", 32, {}),
    "tnt": ("tnt_s_legacy_patch16_224", 32, {}),
    "twins": ("twins_svt_small", 32, {}),
    "vision_transformer": ("vit_tiny_patch16_224", 32, {}),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 32, {}),
    "vision_transformer_relpos": ("vit_srelpos_small_patch16_224", 32, {}),
    "volo": ("volo_d1_224", 32, {}),  # aux_head: a second class output
    "vovnet": ("ese_vovnet19b_slim_dw", 32, {}),
    "xcit": ("xcit_nano_12_p8_224", 32, {"depth": 2}),
}
TRAINED = {module: spec for module, spec in TRAINED.items() if timm.is_model(spec[0])}  # older timm 1.0.x

_SIZES = ("test", "atto", "femto", "pico", "nano", "xxtiny", "xtiny", "tiny", "xxs", "xs", "mini", "small",
          "s")


def _smallest_sounding(names: list[str]) -> str:
    """The variant whose name sounds smallest (``test_*``, ``atto``, ``tiny``...); encoders last."""
    def rank(name: str) -> tuple:
        words = re.split(r"[_\d]+", name)
        size = min((_SIZES.index(w) for w in words if w in _SIZES), default=len(_SIZES))
        return bool(ENCODERS.match(name)), size, len(name), name
    return min(names, key=rank)


def _families() -> dict[str, str]:
    """Every installed timm model module -> one architecture (the trained one where there is one)."""
    picks = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            picks[module] = TRAINED[module][0] if module in TRAINED else _smallest_sounding(names)
    return picks


FAMILIES = _families()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs gain nothing from threads, and on a shared CPU spinning threads cost several
    times the work (this file: ~1 minute on one thread, over 4 with torch's default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(arch: str, image_size: int | None = None, kwargs: dict | None = None):
    """The adapter, or the refusal an encoder must get: a one-line TunelabError naming it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm_adapter(arch, NUM, pretrained=False, image_size=image_size, kwargs=kwargs)
        except TunelabError as err:
            assert ENCODERS.match(arch), f"{arch} refused, but only feature encoders may be: {err}"
            assert "\n" not in str(err) and arch in str(err)
            pytest.skip(f"refused as documented: {err}")


def _class_dependent(arch: str, model: nn.Module, image_size: int | None, kwargs: dict | None) -> list[str]:
    """Parameters whose shape changes with the class count: a twin built on the meta device."""
    extra = dict(kwargs or {})
    if image_size and get_pretrained_cfg(arch).fixed_input_size:
        extra["img_size"] = image_size
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = timm.create_model(arch, pretrained=False, num_classes=NUM + 4, **extra)
    twin = dict(twin.named_parameters())
    return [n for n, p in model.named_parameters() if p.shape != twin[n].shape]


def _check_groups(groups, model: nn.Module, class_dependent: list[str]) -> None:
    names = [g.name for g in groups]
    assert len(set(names)) == len(names), f"duplicate group names: {names}"
    assert names[-1] == "head" and len(names) >= 2, names
    assert set(groups[-1].param_names) == set(class_dependent), (groups[-1].param_names, class_dependent)
    listed = [n for g in groups for n in g.param_names]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters()), "each parameter once"
    assert all(g.param_names for g in groups), "empty group"


def _leaves(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _leaves(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _leaves(item)
    else:
        yield obj


class _FirstUse(TorchFunctionMode):
    """The order in which a forward pass first uses each parameter: every torch call on a
    parameter (functional or a tensor method) passes through here."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.order: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for leaf in _leaves((args, kwargs or {})):
            if id(leaf) in self.names:
                self.order.setdefault(self.names[id(leaf)], len(self.order))
        return func(*args, **(kwargs or {}))


def _assert_input_to_output(groups, order: dict[str, int]) -> None:
    """No group is done before an earlier group has started: each group's last first-use comes
    after the first uses of all groups before it. Groups may overlap, as timm groups them
    (CaiT's stem holds the class token the last blocks insert; EfficientViM's exit norms run
    along the way but feed only its heads), but never swap."""
    used = [(g.name, [order[n] for n in g.param_names if n in order]) for g in groups]
    spans = [(name, min(uses), max(uses)) for name, uses in used if uses]
    started = -1
    for name, first, last in spans:
        assert last > started, f"group {name} is done before an earlier group starts: {spans}"
        started = max(started, first)
    assert spans[-1][0] == "head" and spans[-1][2] == max(s[2] for s in spans), "the head must come last"


@pytest.mark.parametrize("module", sorted(FAMILIES))
def test_every_family_splits_into_ordered_unique_groups_ending_in_exactly_the_new_head(module):
    """Coarse (the default) and fine groups alike, at the family's own input size."""
    arch = FAMILIES[module]
    cfg = get_pretrained_cfg(arch)
    size = TRAINED[module][1] if module in TRAINED else cfg.input_size[-1] if cfg else 224
    with torch.device("meta"):
        adapter = _build(arch, size)
        with _FirstUse(adapter.model.train()) as uses:
            out = adapter.model(torch.empty(2, 3, size, size))
    assert out.shape == (2, NUM)
    class_dependent = _class_dependent(arch, adapter.model, size, None)
    fine = timm_groups(adapter.model, set(adapter.groups[-1].param_names), fine=True)
    for groups in (adapter.groups, fine):
        _check_groups(groups, adapter.model, class_dependent)
        _assert_input_to_output(groups, uses.order)


def test_the_sample_spans_many_families():
    assert len(FAMILIES) >= 60 and len(TRAINED) >= 40, (len(FAMILIES), len(TRAINED))
    for module, (arch, _, _) in TRAINED.items():
        assert arch in timm.list_models(module=module), f"{arch} is not from timm.models.{module}"


@pytest.mark.parametrize("arch", sorted(a for a in timm.list_models() if ENCODERS.match(a)))
def test_a_feature_encoder_is_refused_in_one_line(arch):
    with torch.device("meta"), pytest.raises(TunelabError) as err:
        timm_adapter(arch, NUM, pretrained=False)
    assert "\n" not in str(err.value) and arch in str(err.value) and "classifier" in str(err.value)


@pytest.mark.parametrize("module", sorted(TRAINED))
def test_family_trains_and_a_head_only_step_changes_only_the_head(module):
    """Real weights (random init) on a tiny input: forward, backward, one linear-probe step."""
    arch, size, kwargs = TRAINED[module]
    torch.manual_seed(0)
    adapter = _build(arch, size, kwargs)
    model, groups = adapter.model.train(), adapter.groups
    _check_groups(groups, model, _class_dependent(arch, model, size, kwargs))
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, NUM) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    named = dict(model.named_parameters())
    for g in groups:  # every group takes part in the computation
        assert any(named[n].grad is not None for n in g.param_names), f"group {g.name} got no gradient"

    stage = linear_probe([g.name for g in groups])[0]
    for g in groups:
        for n in g.param_names:
            named[n].grad = None
            named[n].requires_grad_(stage.trains(g.name, n))
    before = {n: p.detach().clone() for n, p in named.items()}
    # every parameter in the optimizer, as FineTuneModule has them: decay would move frozen weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    model(x).logsumexp(dim=1).sum().backward()
    optimizer.step()
    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    head = set(groups[-1].param_names)
    assert moved == head, f"moved beyond or short of the head: {sorted(moved ^ head)}"

    if adapter.features is not None:  # the cached-feature path must compute the same outputs
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(adapter.classify(model, adapter.features(model, x)), model(x))
