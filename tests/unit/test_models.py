"""Backbone weights: renamed ImageNet weights load strictly, match the reference definition, and know espresso."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inspection.errors import ConfigError
from inspection.models import build_net
from inspection.models.backbone import LITE0, create_backbone, lite0_weights_path, load_lite0_imagenet_state_dict
from inspection.models.preprocess import Preprocessor
from inspection.preprocess import preprocess_for

ESPRESSO = 967  # ImageNet class index


@pytest.fixture(scope="module")
def reference():
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(2)
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite0_weights_path())).eval()


@pytest.fixture(scope="module")
def timm_lite0():
    import timm

    model = timm.create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(load_lite0_imagenet_state_dict(), strict=True)  # strict: every key renamed and used
    return model


@pytest.fixture(scope="module")
def coffee_input() -> torch.Tensor:
    from skimage.data import coffee

    # the project's own preprocessing (uint8 HWC in, resize + normalise inside): the one source of truth
    return Preprocessor(preprocess_for(LITE0))(torch.from_numpy(coffee())[None])


def test_renamed_weights_give_the_reference_logits(reference, timm_lite0, coffee_input):
    torch.manual_seed(0)
    x = torch.cat([coffee_input, torch.randn(2, 3, 224, 224)])
    with torch.no_grad():
        ref, ours = reference(x), timm_lite0(x)
    assert ours.shape == (3, 1000)
    assert torch.allclose(ref, ours, atol=1e-5), float((ref - ours).abs().max())


def test_inspection_net_backbone_matches_reference_features(reference, coffee_input):
    net = build_net(LITE0, pretrained=True).eval()
    with torch.no_grad():
        ref = reference.extract_features(coffee_input)
        ours = net.feature_maps(coffee_input)
    assert torch.allclose(ref, ours, atol=1e-5)
    assert net.preprocess.config.mean == (0.5, 0.5, 0.5) and net.preprocess.config.input_size == 224


def test_pretrained_model_sees_an_espresso(timm_lite0, coffee_input):
    with torch.no_grad():
        probs = timm_lite0(coffee_input).softmax(dim=1)[0]
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.8


def test_forward_heatmap_is_consistent_with_the_score():
    torch.manual_seed(0)
    net = build_net("test_efficientnet", pretrained=False, input_size=64).eval()
    images = torch.randint(0, 256, (3, 90, 120, 3), dtype=torch.uint8)  # any camera size
    with torch.no_grad():
        prob, heatmap = net(images)
        logits = net.forward_logits(images)
    assert prob.shape == (3,) and heatmap.dim() == 3 and heatmap.shape[0] == 3
    assert torch.allclose(prob, torch.sigmoid(logits), atol=1e-6)
    assert float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0


def test_other_backbones_need_a_local_weights_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="no packaged weights"):
        create_backbone("test_efficientnet", pretrained=True)
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("no_such_net_v9")
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("test_efficientnet", weights=tmp_path / "missing.pt")
    torch.manual_seed(1)
    source = create_backbone("test_efficientnet", pretrained=False)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("test_efficientnet", weights=path)
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_and_lite2_weights_load_strictly_and_see_an_espresso(name):
    import timm
    from skimage.data import coffee

    from inspection.models.backbone import load_lite_imagenet_state_dict

    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict(load_lite_imagenet_state_dict(name), strict=True)  # every key renamed and used
    x = Preprocessor(preprocess_for(name))(torch.from_numpy(coffee())[None])
    assert preprocess_for(name).input_size == {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}[name]
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    assert int(probs.argmax()) == ESPRESSO


def test_tapped_stages_feed_the_head_and_a_finer_heatmap():
    torch.manual_seed(0)
    net = build_net("tf_efficientnet_lite0", pretrained=False, input_size=300, taps=(2, 3, 4, 5, 6)).eval()
    assert net.widths == (40, 80, 112, 192, 320, 1280) and net.head.in_features == 2024
    with torch.no_grad():
        net.head.weight.normal_(0, 0.02)
        images = torch.randint(0, 256, (2, 300, 300, 3), dtype=torch.uint8)
        prob, heatmap = net(images)
        logits = net.forward_logits(images)
    # the score is exactly the head on the pooled stages; the heatmap sits on a 19x19 grid (1/16 of 300 px)
    assert torch.allclose(prob, torch.sigmoid(logits), atol=1e-5)
    assert heatmap.shape == (2, 19, 19) and float(heatmap.min()) >= 0.0
    # the evidence map peaks at the defect probability: a part the model calls good keeps a faint map
    assert torch.allclose(heatmap.amax(dim=(1, 2)), prob, atol=1e-4)


def test_the_heatmap_of_tapped_stages_points_at_a_planted_spot():
    """The map peaks where the summed class-activation map is highest, scaled by the defect probability."""
    from inspection.models.net import evidence_map

    cam = torch.zeros(1, 19, 19)
    cam[0, 4, 13] = 5.0
    cam[0, 10, 10] = 2.0
    h = evidence_map(cam, torch.tensor([0.9]))
    assert divmod(int(h.flatten().argmax()), 19) == (4, 13) and float(h.max()) == pytest.approx(0.9, abs=1e-4)
    assert float(evidence_map(cam, torch.tensor([0.01])).max()) == pytest.approx(0.01, abs=1e-4)
