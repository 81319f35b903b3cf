"""Adaptive batch normalisation changes BatchNorm running statistics and nothing else."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from inspection.adapt.bn_adapt import adapt_batchnorm, adapted_copy, batchnorm_layers, source_bn_stats
from inspection.adapt.gap import features_and_scores
from inspection.errors import DataError
from inspection.models import build_net
from inspection.synth import render_part

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = build_net("test_efficientnet", pretrained=False, input_size=64).eval()
    # give the BN layers non-trivial "source" statistics first, as training would
    rng = np.random.default_rng(0)
    source = [render_part(rng, bool(i % 2), size=80)[0] for i in range(32)]
    adapt_batchnorm(net, source, batch_size=16, mode="adabn")
    return net


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(1)
    return [render_part(rng, bool(i % 2), size=80)[0] for i in range(48)]


def night(images, strength=0.6, seed=2):
    rng = np.random.default_rng(seed)
    return [
        np.clip(im * (1 - strength) + rng.normal(0, 30 * strength, im.shape), 0, 255).astype(np.uint8) for im in images
    ]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_stat_keys(net):
    return {f"{name}.{stat}" for name in batchnorm_layers(net) for stat in BN_STATS}


@pytest.mark.parametrize("mode", ["adabn", "align"])
def test_only_batchnorm_statistics_change(net, parts, mode):
    source, target = parts[:24], night(parts[24:])
    adapted = copy.deepcopy(net)
    before = _state(adapted)
    params_before = {k: (p.detach().clone(), p.requires_grad) for k, p in adapted.named_parameters()}
    stats = source_bn_stats(net, source, batch_size=8) if mode == "align" else None
    info = adapt_batchnorm(adapted, target, batch_size=8, mode=mode, source_stats=stats)
    after = _state(adapted)
    assert set(before) == set(after)
    stat_keys = _bn_stat_keys(adapted)
    assert stat_keys, "the test network must have BatchNorm layers"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed - stat_keys == set(), f"non-BN-statistics state changed: {sorted(changed - stat_keys)[:5]}"
    # every BN layer's running mean moved (the target is much darker)
    assert {k for k in changed if k.endswith("running_mean")} == {k for k in stat_keys if k.endswith("running_mean")}
    for k, p in adapted.named_parameters():
        assert torch.equal(p, params_before[k][0]), k
        assert p.requires_grad == params_before[k][1]
    # the BN modules are back to their original behaviour
    for m in batchnorm_layers(adapted).values():
        assert not m.training and m.momentum == 0.1
    assert not adapted.training
    assert info.n_images == 24 and info.n_layers == len(batchnorm_layers(adapted)) and info.mean_shift > 0


def test_align_on_source_images_is_nearly_the_identity(net, parts):
    source = parts[:32]
    # one batch: target statistics of every layer are exactly the source's, so the map must be the identity
    adapted, _ = adapted_copy(net, source, source=source, mode="align", batch_size=32)
    _, p0, _ = features_and_scores(net, parts[32:])
    _, p1, _ = features_and_scores(adapted, parts[32:])
    assert np.abs(p0 - p1).max() < 1e-4
    # several batches: per-batch standardisation makes it approximate, still far from a real shift
    adapted, _ = adapted_copy(net, source, source=source, mode="align", batch_size=8)
    _, p2, _ = features_and_scores(adapted, parts[32:])
    assert np.abs(p0 - p2).max() < 2e-2


def test_align_moves_target_features_back_towards_source(net, parts):
    source, target = parts[:24], night(parts[24:])
    fs, _, _ = features_and_scores(net, source)
    ft, _, _ = features_and_scores(net, target)
    adapted, _ = adapted_copy(net, target, source=source, mode="align", batch_size=8)
    fa, _, _ = features_and_scores(adapted, target)
    before = np.linalg.norm(ft.mean(0) - fs.mean(0))
    after = np.linalg.norm(fa.mean(0) - fs.mean(0))
    assert after < 0.5 * before


def test_unreadable_target_leaves_the_network_unchanged(net, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    adapted = copy.deepcopy(net)
    before = _state(adapted)
    with pytest.raises(DataError, match="no target image"):
        adapt_batchnorm(adapted, [bad], mode="adabn")
    after = _state(adapted)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("num_batches_tracked"))


def test_bad_mode_is_refused(net, parts):
    with pytest.raises(ValueError, match="allowed 'adabn' or 'align'"):
        adapt_batchnorm(copy.deepcopy(net), parts[:4], mode="tent")
    with pytest.raises(ValueError, match="needs source"):
        adapted_copy(net, parts[:4], source=None, mode="align")
