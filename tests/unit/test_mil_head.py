"""The multiple-instance head (`head_pooling: lse`): one network formula for training, the cached grid, the cached
trunk and serving; the fit finds a small local defect that the mean pools away; Platt scaling folds into it; the
exported graph matches PyTorch on non-square frames."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection.models import build_net

TAPS = (1, 2)


def _lse_net(temperature: float = 2.0, seed: int = 0):
    torch.manual_seed(seed)
    net = build_net(
        "test_efficientnet",
        pretrained=False,
        input_size=96,
        resize="letterbox",
        taps=TAPS,
        pooling="lse",
        temperature=temperature,
    ).eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 0.2)  # a head with opinions: a zero head makes every path agree trivially
        net.head.bias.fill_(-0.5)
    return net


def test_serving_training_cached_grid_and_cached_trunk_give_one_logit():
    from inspection.train.fitting import RowModel
    from inspection.train.frozen import tail_pooled, trunk_layout, trunk_rows
    from inspection.train.trainer import tail_logits

    net = _lse_net()
    images = torch.randint(0, 256, (3, 70, 150, 3), dtype=torch.uint8)  # non-square: letterboxed inside
    with torch.no_grad():
        prob, heatmap = net(images)
        logits = net.forward_logits(images)
        from_grid = net.logits_from_grid(net.grid_features(images))
        assert torch.allclose(torch.sigmoid(logits), prob, atol=1e-5)  # serving pools the logits' grid
        assert torch.allclose(from_grid, logits, atol=1e-5)
        assert heatmap.shape == (3, net.cam_size(), net.cam_size())
        # the log-sum-exp is not the mean: the same weights averaged give another logit
        mean_net = build_net("test_efficientnet", pretrained=False, input_size=96, resize="letterbox", taps=TAPS)
        mean_net.load_state_dict(net.state_dict())
        assert not torch.allclose(mean_net.eval().forward_logits(images), logits, atol=1e-3)
        for k in range(len(net.backbone.blocks) + 1):  # cached partial: trunk rows + the frozen taps' grids
            layout = trunk_layout(net, k, (96, 96))
            from inspection.preprocess import letterbox_image

            boxed = torch.from_numpy(
                np.stack([letterbox_image(im.numpy(), 96, net.preprocess.config.fill_rgb) for im in images])
            )
            x, frozen = layout.split(trunk_rows(net, boxed, k))
            assert torch.allclose(tail_logits(net, x, k, frozen), net.forward_logits(boxed), atol=1e-4), k
            # the defect-type head's features: fitted on the cache, served by the network, the same numbers
            assert torch.allclose(tail_pooled(net, x, k, frozen), net.pooled_features(boxed), atol=1e-5), k
        grid_rows = net.grid_features(images).flatten(2)
        fitted_on = RowModel(net, None, torch.device("cpu")).pooled(grid_rows)
        assert np.allclose(fitted_on, net.pooled_features(images).double().numpy(), atol=1e-5)


def test_cached_maps_turn_together():
    from inspection.train.frozen import random_d4

    x = torch.randn(2, 3, 5, 5)
    for seed in range(8):
        a, b = random_d4(x, torch.Generator().manual_seed(seed), x.clone())
        assert torch.equal(a, b)


def test_the_fit_finds_a_one_cell_defect_that_the_mean_pools_away_and_sets_the_network_exactly():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from inspection.train.fitting import _set_head
    from inspection.train.mil import fit_mil

    rng = np.random.default_rng(0)

    def rows(n: int) -> tuple[torch.Tensor, np.ndarray]:
        x = rng.normal(0, 1, (n, 8, 36)).astype(np.float32)
        y = (np.arange(n) % 2).astype(int)
        cells = rng.integers(0, 36, n)
        x[y == 1, 3, cells[y == 1]] += 4.0  # one cell of one channel: 4 sigma there, 0.11 sigma on average
        return torch.from_numpy(x).half(), y

    x_train, y_train = rows(400)
    x_test, y_test = rows(400)
    head = fit_mil(x_train, y_train, temperature=1.0)
    mil_auc = roc_auc_score(y_test, head.logits(x_test))
    pooled = LogisticRegression(max_iter=2000).fit(x_train.float().mean(2).numpy(), y_train)
    mean_auc = roc_auc_score(y_test, pooled.decision_function(x_test.float().mean(2).numpy()))
    assert mil_auc >= 0.95 and mil_auc > mean_auc + 0.1, (mil_auc, mean_auc)

    net = _lse_net(temperature=1.0)
    images = torch.randint(0, 256, (6, 96, 96, 3), dtype=torch.uint8)
    with torch.no_grad():
        grid = net.grid_features(images).flatten(2)
    real = fit_mil(grid, np.array([0, 1] * 3), temperature=1.0)
    _set_head(net, real.weight, real.bias)
    with torch.no_grad():
        expected = net.forward_logits(images).numpy()
    assert np.allclose(real.logits(grid.half()), expected, atol=2e-2)  # the cache is half precision
    assert np.allclose(real.logits(grid), expected, atol=1e-4)


def test_platt_scaling_folds_into_the_head_and_its_temperature():
    from inspection.train.linear import Platt
    from inspection.train.trainer import _fold_platt

    net = _lse_net(temperature=1.5)
    images = torch.randint(0, 256, (4, 80, 120, 3), dtype=torch.uint8)
    platt = Platt(a=2.5, b=-1.0)
    with torch.no_grad():
        expected = platt(net.forward_logits(images).numpy())
        _fold_platt(net, platt)
        got = net(images)[0].numpy()
    assert net.temperature == pytest.approx(1.5 / 2.5)
    assert np.allclose(got, expected, atol=1e-5)


@dataclass
class _Sample:
    path: Path
    label: str | None


def test_the_exported_lse_graph_matches_pytorch_on_non_square_frames(tmp_path: Path, tiny_run: Path):
    from inspection.export import ExportConfig, export_net
    from inspection.export.parity import check_parity
    from inspection.images import encode_png
    from inspection.schemas import ModelCard

    torch.set_num_threads(2)
    net = _lse_net()
    rng = np.random.default_rng(5)
    val = []
    for i, hw in enumerate([(120, 630), (630, 200), (300, 300), (90, 400)]):
        path = tmp_path / f"val{i}.png"
        path.write_bytes(encode_png(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)))
        val.append(_Sample(path, "defect" if i % 2 else "ok"))
    card = ModelCard.model_validate_json((tiny_run / "model_card.json").read_text())
    card = card.model_copy(update={"preprocess": net.preprocess.config.to_dict()})
    result = export_net(ExportConfig(measure_latency=False), net, card, tmp_path / "export", val=val)
    assert result.dynamic_size and result.parity.passed
    frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in [(33, 500), (500, 33), (96, 96)]]
    report = check_parity(net, result.model_path, frames, result.card.thresholds, max_prob_diff=1e-5)
    assert report.passed and report.max_prob_diff <= 1e-5, report.failures
    assert report.max_heatmap_diff <= 1e-4
