"""Shape-preserving preprocessing: config round trip, letterbox geometry, loader twin, ONNX parity on any aspect."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from inspection.errors import DataError
from inspection.models.preprocess import Preprocessor
from inspection.preprocess import (
    IMAGENET_PREPROCESS,
    PreprocessConfig,
    content_box,
    letterbox_image,
    preprocess_for,
    square_padding,
)

ASPECTS = [(120, 630), (630, 200), (300, 300), (97, 131)]  # (H, W): wide, tall, square, odd


def _to_pixels(config: PreprocessConfig, x: torch.Tensor) -> np.ndarray:
    """Normalised network input (1, 3, S, S) back to grey levels (S, S, 3) float."""
    mean = np.array(config.mean, np.float32)
    std = np.array(config.std, np.float32)
    return (x[0].permute(1, 2, 0).numpy() * std + mean) * 255.0


def _photo_with_square(h: int, w: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """A light textured photo (H, W) with a black square of `side` px somewhere inside."""
    img = rng.normal(200, 6, (h, w)).clip(0, 255).astype(np.uint8)
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    img[y : y + side, x : x + side] = 0
    return np.repeat(img[..., None], 3, axis=2)


# -- config --------------------------------------------------------------------------------------------------------


def test_cards_without_resize_load_as_squash_and_letterbox_round_trips() -> None:
    old = {"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "channels": "RGB"}
    cfg = PreprocessConfig.from_dict(old)
    assert cfg.resize == "squash" and cfg == PreprocessConfig()
    lb = preprocess_for("tf_efficientnet_lite0", 300, "letterbox")
    d = lb.to_dict()
    assert d["resize"] == "letterbox" and d["input_size"] == 300 and d["fill"] == [128, 128, 128]
    assert PreprocessConfig.from_dict(json.loads(json.dumps(d))) == lb
    assert preprocess_for("tf_efficientnet_lite0").resize == "squash"  # the default stays today's behaviour
    assert IMAGENET_PREPROCESS.fill == (124, 116, 104)  # the mean, per channel: ~0 after normalising
    grey = PreprocessConfig(resize="letterbox", fill=(90, 90, 90))
    assert PreprocessConfig.from_dict(grey.to_dict()).fill == (90, 90, 90)
    with pytest.raises(ValueError, match="resize"):
        PreprocessConfig(resize="crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fill"):
        PreprocessConfig(fill=(0, 300, 0))


def test_square_padding_centres_the_frame() -> None:
    assert square_padding(120, 630) == (255, 255, 0, 0)
    assert square_padding(631, 200) == (0, 0, 215, 216)
    assert square_padding(300, 300) == (0, 0, 0, 0)
    top, left, bottom, right = content_box(PreprocessConfig(resize="letterbox"), 120, 630)
    assert (left, right) == (0.0, 1.0) and bottom - top == pytest.approx(120 / 630)
    assert content_box(PreprocessConfig(), 120, 630) == (0.0, 0.0, 1.0, 1.0)


# -- geometry ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", ASPECTS[:2], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_a_square_in_a_non_square_photo_stays_square(hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    photo = _photo_with_square(*hw, side=60, rng=rng)
    for resize, square in (("letterbox", True), ("squash", False)):
        config = PreprocessConfig(input_size=224, resize=resize)
        with torch.no_grad():
            x = Preprocessor(config)(torch.from_numpy(photo)[None])
        assert x.shape == (1, 3, 224, 224)
        dark = _to_pixels(config, x)[..., 0] < 60
        ys, xs = np.nonzero(dark)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        if square:
            expected = 60 * 224 / max(hw)  # one scale for both axes
            assert abs(height - width) <= 1 and abs(height - expected) <= 1.5, (resize, height, width)
        else:
            assert max(height, width) / min(height, width) > 1.5, (resize, height, width)  # squashing distorts


def test_letterbox_pads_with_the_fill_around_the_frame() -> None:
    config = PreprocessConfig(input_size=128, resize="letterbox")
    photo = np.full((64, 256, 3), 250, np.uint8)
    with torch.no_grad():
        px = _to_pixels(config, Preprocessor(config)(torch.from_numpy(photo)[None]))
    # the frame lands on rows 48..80 of 128 (scale 0.5, centred); above and below is the fill
    assert np.allclose(px[:46], 128, atol=0.01) and np.allclose(px[82:], 128, atol=0.01)
    assert np.allclose(px[50:78], 250, atol=0.01)
    normalised = Preprocessor(config)(torch.from_numpy(photo)[None])[0, :, :40]
    assert float(normalised.abs().max()) < 0.01  # the pad is ~0 for the network: the mean grey


@pytest.mark.parametrize("hw", ASPECTS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_loader_twin_gives_the_network_what_the_graph_computes(hw: tuple[int, int]) -> None:
    """The training loader letterboxes with NumPy/OpenCV before batching; the network then sees the same input as
    from the raw frame (up to uint8 rounding of the loader's copy)."""
    config = PreprocessConfig(input_size=224, resize="letterbox")
    rng = np.random.default_rng(1)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), (0, 0), 1.5)
    pre = Preprocessor(config)
    with torch.no_grad():
        direct = pre(torch.from_numpy(photo)[None])
        boxed = letterbox_image(photo, 224, config.fill_rgb)
        assert boxed.shape == (224, 224, 3) and boxed.dtype == np.uint8
        via_loader = pre(torch.from_numpy(boxed)[None])
    grey_levels = (direct - via_loader).abs().max().item() / float(pre.scale.min())
    assert grey_levels <= 1.5, grey_levels


def test_image_dataset_letterboxes_to_the_square_input_and_refuses_other_sizes(tmp_path: Path) -> None:
    from inspection.images import encode_png
    from inspection.train.data import ImageDataset, loader_size, make_sample

    rng = np.random.default_rng(2)
    samples = []
    for i, hw in enumerate(ASPECTS):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode_png(_photo_with_square(*hw, side=40, rng=rng)))
        samples.append(make_sample(path, f"{i:064d}", "ok", "train", f"g{i}"))
    config = PreprocessConfig(input_size=96, resize="letterbox")
    assert loader_size(samples, config) == (96, 96)
    assert loader_size(samples, PreprocessConfig(input_size=96)) != (96, 96)  # squash: the most common size
    ds = ImageDataset(samples, (96, 96), preprocess=config)
    for i in range(len(ASPECTS)):
        img, target = ds[i]
        assert tuple(img.shape) == (96, 96, 3) and target == 0
        expected = letterbox_image(np.asarray(_read(samples[i].path)), 96, config.fill_rgb)
        np.testing.assert_array_equal(img.numpy(), expected)
    with pytest.raises(DataError, match="square"):
        ImageDataset(samples, (120, 630), preprocess=config)


def _read(path: Path) -> np.ndarray:
    from inspection.images import read_image

    return read_image(path)


# -- export --------------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    path: Path
    label: str | None


@pytest.fixture(scope="module")
def letterbox_export(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path):
    """A small untrained letterbox network exported through the real export path (parity on non-square frames)."""
    from inspection.export import ExportConfig, export_net
    from inspection.images import encode_png
    from inspection.models import build_net
    from inspection.schemas import ModelCard

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("letterbox_export")
    net = build_net("test_efficientnet", pretrained=False, input_size=96, resize="letterbox").eval()
    rng = np.random.default_rng(3)
    val = []
    for i, hw in enumerate([(120, 630)] * 3 + [(630, 200)] * 2 + [(300, 300)]):
        path = tmp / f"val{i}.png"
        path.write_bytes(encode_png(_photo_with_square(*hw, side=50, rng=rng)))
        val.append(_Sample(path, "defect" if i % 2 else "ok"))
    card = ModelCard.model_validate_json((tiny_run / "model_card.json").read_text())
    card = card.model_copy(update={"preprocess": net.preprocess.config.to_dict()})
    result = export_net(ExportConfig(measure_latency=False), net, card, tmp / "export", val=val)
    return net, result


def test_letterbox_exports_with_dynamic_size_and_matches_pytorch_on_any_aspect(letterbox_export) -> None:
    from inspection.export.parity import check_parity

    net, result = letterbox_export
    assert result.dynamic_size and result.parity.passed and result.shape_parity is not None
    assert result.shape_parity.passed
    assert {tuple(s[:2]) for s in result.parity.shapes} == {(120, 630), (630, 200), (300, 300)}
    dims = onnx.load(str(result.model_path)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims[:3]), "N, H and W must stay symbolic with the letterbox inside"
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in [*ASPECTS, (33, 500), (500, 33)]]
    report = check_parity(net, result.model_path, frames, result.card.thresholds, max_prob_diff=1e-5)
    assert report.passed and report.max_prob_diff <= 1e-5, report.failures
    assert report.max_heatmap_diff <= 1e-4


def test_model_card_carries_the_resize(letterbox_export) -> None:
    from inspection.onnx_infer import OnnxModel

    net, result = letterbox_export
    side = json.loads((result.out / "model_card.json").read_text())
    assert side["preprocess"] == net.preprocess.config.to_dict()
    assert side["preprocess"]["resize"] == "letterbox" and side["preprocess"]["fill"] == [124, 116, 104]  # ImageNet
    loaded = OnnxModel(result.model_path, providers=["CPUExecutionProvider"])
    assert PreprocessConfig.from_dict(loaded.card.preprocess).resize == "letterbox"  # embedded card too
    meta = {p.key: p.value for p in onnx.load(str(result.model_path)).metadata_props}
    assert meta["resize"] == "letterbox"


def test_the_runner_stores_a_letterboxed_models_heatmap_cropped_to_the_photo():
    from types import SimpleNamespace

    from inspection.preprocess import PreprocessConfig
    from inspection.runner.inferencer import Inferencer
    from inspection.schemas import Thresholds

    card = SimpleNamespace(
        preprocess=PreprocessConfig(input_size=300, resize="letterbox").to_dict(),
        thresholds=Thresholds(reject=0.5, review=0.3),
        defect_types=[],
    )
    inf = Inferencer.__new__(Inferencer)
    inf.preprocess = PreprocessConfig.from_dict(card.preprocess)
    heat = np.arange(19 * 19, dtype=np.float32).reshape(19, 19)
    wide = inf._on_the_photo(heat, (100, 400, 3))  # a 4:1 photo fills a quarter of the square's height
    # the photo spans rows 0.375..0.625 of the padded square: cells 7..11 of the 19
    assert np.array_equal(wide, heat[7:12])
    tall = inf._on_the_photo(heat, (400, 100, 3))
    assert np.array_equal(tall, heat[:, 7:12])
    assert inf._on_the_photo(heat, (300, 300, 3)).shape == (19, 19)
    inf.preprocess = PreprocessConfig(input_size=300)  # squash: the map already lies over the photo
    assert inf._on_the_photo(heat, (100, 400, 3)) is heat
