"""Training: what each mode freezes, bad configs, the run directory contract, load_run, resume, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from inspection.config import from_dict, load_config
from inspection.errors import ConfigError, DataError
from inspection.images import read_image
from inspection.models import build_net
from inspection.schemas import ModelCard
from inspection.train import TrainConfig, calibrate_threshold, load_run, run_train
from inspection.train.data import make_sample
from inspection.train.trainer import apply_freeze, param_groups, predict_scores, set_train_mode

TINY = Path(__file__).resolve().parents[2] / "configs" / "train_tiny.yaml"


def tiny_config(**overrides) -> TrainConfig:
    return replace(load_config(TrainConfig, TINY), **overrides)


# ------------------------------------------------------------------------------------------------------- freezing
def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _one_step(mode: str, **overrides) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimiser step in `mode` on random images; returns (net, state before, state after)."""
    torch.manual_seed(0)
    net = build_net("test_efficientnet", pretrained=False, input_size=64)
    # pretrained=True in the config: the modes treat the (random) test backbone as if it were pretrained
    config = tiny_config(mode=mode, pretrained=True, trainable_blocks=2, **overrides)
    apply_freeze(net, config)
    set_train_mode(net, config)
    before = _snapshot(net)
    optimizer = torch.optim.AdamW(param_groups(net, config))
    images = torch.randint(0, 256, (8, 72, 72, 3), dtype=torch.uint8)
    loss = nn.functional.binary_cross_entropy_with_logits(net.forward_logits(images), torch.tensor([0.0, 1.0] * 4))
    loss.backward()
    optimizer.step()
    return net, before, _snapshot(net)


def _changed(before, after, name) -> bool:
    return not torch.equal(before[name], after[name])


def _trainable_prefixes(n_stages: int, trained_stages: int) -> tuple[str, ...]:
    return tuple(f"backbone.blocks.{i}." for i in range(n_stages - trained_stages, n_stages)) + (
        "backbone.conv_head.",
        "backbone.bn2.",
        "head.",
    )


def test_head_mode_freezes_the_whole_backbone_and_its_bn_statistics():
    net, before, after = _one_step("head")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert not net.backbone.training  # eval mode: BN statistics stay put
    for name in before:
        if name.startswith("backbone."):
            assert not _changed(before, after, name), name
    assert _changed(before, after, "head.weight")


def test_partial_mode_trains_exactly_the_last_stages():
    net, before, after = _one_step("partial", freeze_bn=False)
    n_stages = len(net.backbone.blocks)
    trainable = _trainable_prefixes(n_stages, 2)
    for name, p in net.named_parameters():
        assert p.requires_grad == name.startswith(trainable), name
    for name in before:
        if name.startswith(trainable):
            if not name.endswith("num_batches_tracked"):
                assert _changed(before, after, name), f"{name} should have been updated"
        else:
            assert not _changed(before, after, name), f"{name} is frozen but changed"
    # frozen stages are in eval mode, trained ones in train mode
    assert not net.backbone.blocks[0].training and not net.backbone.conv_stem.training
    assert net.backbone.blocks[-1].training


def test_partial_mode_with_frozen_bn_keeps_all_statistics():
    net, before, after = _one_step("partial", freeze_bn=True)
    for name in before:
        if _bn_buffer(name):
            assert not _changed(before, after, name), name
    assert _changed(before, after, "backbone.conv_head.weight")
    assert not _changed(before, after, "backbone.blocks.0.0.conv.weight")


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_full_mode_trains_everything(freeze_bn: bool):
    net, before, after = _one_step("full", freeze_bn=freeze_bn)
    assert all(p.requires_grad for p in net.parameters())
    for name in before:
        if _bn_buffer(name):
            if not name.endswith("num_batches_tracked"):
                assert _changed(before, after, name) != freeze_bn, name
        else:
            assert _changed(before, after, name), name


def test_full_mode_learning_rates_fall_toward_the_input():
    net = build_net("test_efficientnet", pretrained=False, input_size=64)
    config = tiny_config(mode="full", pretrained=True, layer_decay=0.5, backbone_lr=1e-3, lr=1e-2, l2sp=1e-3)
    apply_freeze(net, config)
    groups = param_groups(net, config)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-2
    lrs = [g["lr"] for g in groups[1:]]
    assert [g["name"] for g in groups[1:]][0] == "top" and groups[-1]["name"] == "stem"
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 1e-3 and lrs[-1] < lrs[0] / 10
    # with L2-SP the backbone is pulled toward the pretrained weights, not toward zero
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.parameters()))


# ---------------------------------------------------------------------------------------------------- bad configs
def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="mode.*'bogus'.*allowed.*head.*partial.*full"):
        from_dict(TrainConfig, {"mode": "bogus"})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["epochs=0"], "epochs: got 0"),
        (["nosuchkey=1"], "unknown key"),
        (["augment.noise_std_range=0.5,0.1"], "noise_std_range"),
        (["target_escape_rate=0.01", "review_escape_rate=0.05"], "review_escape_rate"),
        (["augment.rotate_p=2"], "probability"),
        (["head_pooling=max"], "head_pooling: got 'max'"),
        (["head_pooling=lse", "pool_temperature=0"], "pool_temperature: got 0"),
        (["mode=head", "head_pooling=lse", "head_solver=adamw"], "head_solver: lbfgs"),
    ],
)
def test_bad_config_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, TINY, overrides)


def test_missing_data_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="data not found"):
        run_train(tiny_config(), tmp_path / "nope", tmp_path / "run")
    with pytest.raises(ConfigError, match="no data"):
        run_train(tiny_config(), None, tmp_path / "run")


def _fake_samples(tmp_path: Path, spec: dict[str, list[str]]) -> list:
    samples = []
    for split, labels in spec.items():
        for i, label in enumerate(labels):
            path = tmp_path / f"{split}{i}.png"
            samples.append(make_sample(path, f"{split}{i:060d}", label, split, f"g{split}{i}"))
    return samples


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"train": ["ok", "ok", "ok"], "val": ["ok", "defect"]}, "train split holds one class only"),
        ({"train": ["ok", "defect"], "val": ["defect"]}, "val split holds one class only"),
        ({"train": ["ok", "defect"], "test": ["ok", "defect"]}, "val split is empty"),
        ({"val": ["ok", "defect"]}, "train split is empty"),
    ],
)
def test_unusable_splits_fail_clearly(tmp_path: Path, spec, match):
    with pytest.raises(DataError, match=match):
        run_train(tiny_config(), _fake_samples(tmp_path, spec), tmp_path / "run")


def test_too_many_trainable_blocks(synth_store: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="trainable_blocks: got 9"):
        run_train(tiny_config(mode="partial", trainable_blocks=9), synth_store, tmp_path / "run")


# -------------------------------------------------------------------------------------------- the run directory
def test_tiny_run_directory_contract(tiny_run: Path):
    for name in ("config.yaml", "checkpoint.pt", "last.pt", "metrics.json", "model_card.json", "samples.json"):
        assert (tiny_run / name).is_file(), name
    ckpt = torch.load(tiny_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"model_state", "backbone", "input_size", "preprocess", "dropout", "mode", "epoch"} <= set(ckpt)
    assert ckpt["backbone"] == "test_efficientnet" and ckpt["input_size"] == 64
    card = ModelCard.model_validate_json((tiny_run / "model_card.json").read_text())
    assert card.files == {}
    assert {"val", "test"} <= set(card.metrics)
    assert card.thresholds.review <= card.thresholds.reject
    assert card.calibration["reject"]["escape_rate"] <= card.target_escape_rate
    samples = json.loads((tiny_run / "samples.json").read_text())
    assert set(samples) == {"train", "val", "test"}
    assert all({"sha256", "path", "label"} <= set(r) for rows in samples.values() for r in rows)
    plots = {p.name for p in (tiny_run / "plots").glob("*.png")}
    assert {"roc.png", "pr.png", "confusion.png", "score_hist.png", "worst_mistakes.png", "history.png"} <= plots
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test"]["confusion"] == card.metrics["test"].confusion


def test_load_run_reproduces_the_calibrated_thresholds(tiny_run: Path):
    run = load_run(tiny_run)
    assert not run.net.training
    assert run.config.backbone == "test_efficientnet"
    assert run.net.preprocess.config.input_size == 64
    assert type(run.samples["val"][0]).__name__ == "Sample"
    val = run.samples["val"]
    scores = predict_scores(run.net, val, (300, 300))
    labels = [s.label for s in val]
    again = calibrate_threshold(scores, labels, run.card.target_escape_rate, run.config.review_escape_rate)
    assert again.reject == pytest.approx(run.card.thresholds.reject, abs=1e-6)
    # forward (the exported path: probability + heatmap) agrees with the training path
    images = torch.from_numpy(np.stack([read_image(s.path) for s in val[:4]]))
    with torch.no_grad():
        prob, heatmap = run.net(images)
        logits = run.net.forward_logits(images)
    assert torch.allclose(prob, torch.sigmoid(logits), atol=1e-5)
    assert heatmap.shape[0] == 4 and float(heatmap.min()) >= 0 and float(heatmap.max()) <= 1


def test_resume_continues_where_an_interrupted_run_stopped(synth_store: Path, tmp_path: Path, monkeypatch):
    import inspection.train.loop as trainer

    config = tiny_config(epochs=3, patience=10, plots=False, augment=tiny_config().augment)
    full = run_train(config, synth_store, tmp_path / "a")

    real_save = trainer._save_last

    def save_then_die(path, net, optimizer, scheduler, state, cfg, generator):
        real_save(path, net, optimizer, scheduler, state, cfg, generator)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, synth_store, tmp_path / "b")
    monkeypatch.setattr(trainer, "_save_last", real_save)
    resumed = run_train(replace(config, resume=True), synth_store, tmp_path / "b")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert resumed.card.thresholds.reject == pytest.approx(full.card.thresholds.reject, rel=1e-5)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_train(config, synth_store, tmp_path / "a")  # never overwrite a finished run by accident


def test_head_mode_caches_features(synth_store: Path, tmp_path: Path, monkeypatch):
    from inspection.models.net import InspectionNet

    weights = tmp_path / "tiny_weights.pt"
    torch.save(build_net("test_efficientnet", pretrained=False).backbone.state_dict(), weights)
    config = tiny_config(mode="head", pretrained=True, weights=str(weights), head_epochs=20, plots=False)
    config = replace(config, feature_cache=str(tmp_path / "cache"))
    first = run_train(config, synth_store, tmp_path / "a")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    calls = []
    real = InspectionNet.pooled_features
    monkeypatch.setattr(InspectionNet, "pooled_features", lambda self, x: calls.append(len(x)) or real(self, x))
    second = run_train(config, synth_store, tmp_path / "b")
    assert calls == []  # every feature came from the cache
    assert second.card.thresholds == first.card.thresholds
    # the backbone in the checkpoint is the supplied one, untouched by head training
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model_state"]
    original = torch.load(weights, weights_only=True)
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in original.items())


def test_cached_trunk_plus_tail_equals_the_full_forward():
    from inspection.train.trainer import tail_logits, trunk_activations

    torch.manual_seed(0)
    net = build_net("test_efficientnet", pretrained=False, input_size=64).eval()
    images = torch.randint(0, 256, (4, 80, 80, 3), dtype=torch.uint8)
    with torch.no_grad():
        full = net.forward_logits(images)
        for k in range(len(net.backbone.blocks) + 1):
            assert torch.allclose(tail_logits(net, trunk_activations(net, images, k), k), full, atol=1e-5), k


def test_partial_with_cached_trunk(synth_store: Path, tmp_path: Path):
    weights = tmp_path / "tiny_weights.pt"
    torch.manual_seed(3)
    original = build_net("test_efficientnet", pretrained=False).backbone.state_dict()
    torch.save(original, weights)
    config = tiny_config(
        mode="partial", pretrained=True, weights=str(weights), partial_cache=True, trainable_blocks=2, cached_views=1
    )
    result = run_train(replace(config, epochs=3, plots=False), synth_store, tmp_path / "run")
    assert result.epochs_run >= 1
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model_state"]
    n_stages = len(build_net("test_efficientnet", pretrained=False).backbone.blocks)
    frozen = ("conv_stem.", "bn1.") + tuple(f"blocks.{i}." for i in range(n_stages - 2))
    for k, v in original.items():
        if k.startswith(frozen):
            assert torch.equal(saved[f"backbone.{k}"], v), k
    assert not torch.equal(saved["backbone.conv_head.weight"], original["conv_head.weight"])
    # thresholds calibrated on cached activations hold for the full forward the export will trace
    run = load_run(tmp_path / "run")
    scores = predict_scores(run.net, run.samples["val"], (300, 300))
    again = calibrate_threshold(scores, [s.label for s in run.samples["val"]], config.target_escape_rate, 0.0)
    assert again.reject == pytest.approx(run.card.thresholds.reject, abs=1e-5)


def test_train_cli(synth_store: Path, tmp_path: Path, capsys):
    from inspection.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", str(TINY), "--data", str(synth_store), "--out", str(out)]
    rc = main([*args, "epochs=1", "plots=false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_run"] == 1 and summary["mode"] == "full"
    assert (out / "model_card.json").is_file()
    rc = main([*args, "mode=sideways"])
    assert rc == 1
    assert "allowed" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_amp_channels_last_step(synth_store: Path, tmp_path: Path):
    result = run_train(tiny_config(device="cuda", amp=True, channels_last=True, epochs=1), synth_store, tmp_path / "r")
    assert result.epochs_run == 1
    assert np.isfinite(result.history[0]["train_loss"])
