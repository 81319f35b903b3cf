"""Domain-gap score: small between halves of one domain, rising with the strength of a shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspection.adapt.config import GapConfig
from inspection.adapt.gap import domain_gap, features_and_scores, frechet_distance, image_gap
from inspection.errors import DataError
from inspection.models import build_net
from inspection.synth import render_part


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return build_net("test_efficientnet", pretrained=False, input_size=64).eval()


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(0)
    return [render_part(rng, bool(i % 2), size=80)[0] for i in range(120)]


def night(images, s):
    rng = np.random.default_rng(5)
    return [np.clip(im * (1 - 0.6 * s) + rng.normal(0, 30 * s, im.shape), 0, 255).astype(np.uint8) for im in images]


def gamma(images, s):
    g = 1.0 + 1.5 * s
    return [(255.0 * (im / 255.0) ** g).astype(np.uint8) for im in images]


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 3))
    b = rng.normal(0, 1, (4000, 3)) * 2.0 + np.array([3.0, 0, 0])
    # |mu|^2 + tr(I + 4I - 2 * 2I) = 9 + 3
    assert frechet_distance(a, b, pca_dim=3, shrinkage=False) == pytest.approx(12.0, rel=0.05)
    assert frechet_distance(a, a, pca_dim=3) == pytest.approx(0.0, abs=1e-6)


def test_gap_small_between_halves_and_monotonic_with_shift(net, parts):
    source, rest = parts[:60], parts[60:]
    config = GapConfig(calibration_splits=5)
    fs, _, _ = features_and_scores(net, source)
    same = domain_gap(fs, features_and_scores(net, rest)[0], config)
    assert not same.warning
    assert same.score <= 1.5 * same.noise_floor  # two samples of one domain: within sampling noise
    for shift in (night, gamma):
        scores = [domain_gap(fs, features_and_scores(net, shift(rest, s))[0], config).score for s in (0.3, 0.6, 1.0)]
        assert same.score < scores[0] < scores[1] < scores[2], (shift.__name__, same.score, scores)
    strong = image_gap(net, source, night(rest, 1.0), config)
    assert strong.warning and strong.score > strong.warn_level >= config.min_warn_level
    assert "unreliable" in strong.message
    assert strong.to_dict()["warn_level"] == strong.warn_level


def test_gap_refuses_too_few_or_mismatched_features():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="too few images"):
        domain_gap(rng.normal(size=(5, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(DataError, match="same C"):
        domain_gap(rng.normal(size=(50, 4)), rng.normal(size=(50, 3)))


def test_noise_floor_from_halves_by_part_when_each_part_is_photographed_many_times():
    """A source of 12 parts x 20 photos each: a new batch of 12 *other* parts of the same domain must not warn.
    Random halves share every part and understate the spread (it warns); halves by part do not."""
    rng = np.random.default_rng(0)
    dims = 16

    def photos(centres: np.ndarray) -> tuple[np.ndarray, list[str]]:
        feats = np.concatenate([c + 0.1 * rng.normal(size=(20, dims)) for c in centres])
        return feats, [f"part-{i}" for i in range(len(centres)) for _ in range(20)]

    source, groups = photos(rng.normal(size=(12, dims)))
    new_parts, _ = photos(rng.normal(size=(12, dims)))  # same domain: part centres from the same distribution
    shifted, _ = photos(rng.normal(size=(12, dims)) + 2.5)
    config = GapConfig(calibration_splits=8, pca_dim=8)
    by_photo = domain_gap(source, new_parts, config)
    by_part = domain_gap(source, new_parts, config, source_groups=groups)
    assert by_photo.halves == "random" and by_part.halves == "parts"
    assert by_part.noise_floor > 2 * by_photo.noise_floor
    assert by_photo.warning and not by_part.warning
    assert domain_gap(source, shifted, config, source_groups=groups).warning  # a real shift still warns
    with pytest.raises(DataError, match="source_groups"):
        domain_gap(source, new_parts, config, source_groups=groups[:-1])
