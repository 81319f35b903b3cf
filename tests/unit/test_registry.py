"""Registry: immutable versions, sha256 checks, the gate, promote/rollback/history, concurrent promotions.

The model is `known_export` (tests/fixtures/model.py): built, not trained, so that its golden-set figures are known
before the test runs (escape rate 0, false-reject rate 0) on any CPU. Worse candidates are the same network with
its thresholds moved, so every gate decision below follows from the thresholds alone.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import onnx
import pytest

from inspection.errors import IntegrityError, RegistryError
from inspection.registry import Registry, RegistryConfig, sha256_file
from inspection.schemas import ModelCard


def _variant(export_dir: Path, tmp_path: Path, name: str, reject: float | None = None) -> Path:
    """A copy of an export under another version name (and optionally other thresholds), files re-hashed."""
    out = tmp_path / name
    shutil.copytree(export_dir, out)
    card = ModelCard.model_validate_json((out / "model_card.json").read_text())
    thresholds = card.thresholds
    if reject is not None:
        thresholds = thresholds.model_copy(update={"reject": reject, "review": reject})
    model = onnx.load(str(out / "model.onnx"))
    model.doc_string = f"variant {name}"  # different bytes, so a different sha256
    for prop in model.metadata_props:
        if prop.key == "model_card":
            prop.value = card.model_copy(
                update={"version": name, "thresholds": thresholds, "files": {}}
            ).model_dump_json()
    onnx.save(model, str(out / "model.onnx"))
    for extra in out.glob("model.*.onnx"):
        extra.unlink()
    files = {"model.onnx": sha256_file(out / "model.onnx")}
    new_card = card.model_copy(update={"version": name, "thresholds": thresholds, "files": files})
    (out / "model_card.json").write_text(new_card.model_dump_json())
    return out


@pytest.fixture
def registry(synth_store: Path, tmp_path: Path) -> Registry:
    """A fresh registry with the shipped gate limits, its golden set frozen from the synthetic store."""
    return Registry.init(tmp_path / "reg", RegistryConfig(golden_set=str(synth_store)))


def test_the_known_model_is_perfect_on_the_golden_set(registry: Registry, known_export: Path) -> None:
    figures = registry.golden_figures(registry.register(known_export))
    assert figures.n > 0 and 0 < figures.n_defect < figures.n
    assert (figures.escape_rate, figures.false_reject_rate, figures.review_rate, figures.accuracy) == (0, 0, 0, 1)


def test_register_is_immutable_and_idempotent(registry: Registry, known_export: Path, tmp_path: Path) -> None:
    v = registry.register(known_export)
    assert registry.versions() == [v]
    assert registry.register(known_export) == v  # same files: same version, nothing added
    assert registry.versions() == [v]
    clash = tmp_path / "clash"
    shutil.copytree(known_export, clash)
    card = json.loads((clash / "model_card.json").read_text())
    card["files"]["model.onnx"] = "0" * 64
    (clash / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(IntegrityError):  # the export itself does not match its card
        registry.register(clash)
    mv = registry.get(v)
    assert (mv.dir / "SHA256SUMS").read_text().startswith(mv.card.files["model.onnx"])


def test_tampered_model_file_is_refused(registry: Registry, known_export: Path) -> None:
    v = registry.register(known_export)
    path = registry.root / "versions" / v / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        registry.get(v)
    from inspection.onnx_infer import OnnxModel

    with pytest.raises(IntegrityError):
        OnnxModel(
            path, expected_sha256=json.loads((path.parent / "model_card.json").read_text())["files"]["model.onnx"]
        )


def test_promote_rollback_and_history(registry: Registry, known_export: Path, tmp_path: Path) -> None:
    v1 = registry.register(known_export)
    first = registry.promote(v1, reason="first", user="alice")  # by the gate, within the shipped first-model limits
    assert first.promoted and not first.forced, first.reason
    v2 = registry.register(_variant(known_export, tmp_path, "v2"))
    second = registry.promote(v2, reason="same figures", user="bob")
    assert second.promoted, second.reason  # identical scores: not worse on either rate
    assert registry.aliases() == {"production": v2, "previous": v1}
    assert registry.rollback(reason="line complaint", user="carol") == v1
    assert registry.aliases() == {"production": v1, "previous": v2}
    actions = [(h["action"], h.get("version"), h["user"]) for h in registry.history()]
    assert actions == [
        ("register", v1, actions[0][2]),
        ("promote", v1, "alice"),
        ("register", v2, actions[2][2]),
        ("promote", v2, "bob"),
        ("rollback", v1, "carol"),
    ]
    assert registry.history()[-1]["from"] == v2 and registry.history()[-1]["reason"] == "line complaint"


def test_gate_refuses_a_worse_candidate_and_force_is_recorded(
    registry: Registry, known_export: Path, tmp_path: Path
) -> None:
    v1 = registry.register(known_export)
    registry.promote(v1, reason="first", force=True)
    blind = registry.register(_variant(known_export, tmp_path, "blind", reject=1.0))  # passes every part
    figures = registry.golden_figures(blind)
    assert figures.escape_rate == 1.0
    report = registry.promote(blind, reason="try")
    assert not report.promoted and "escape rate" in report.reason
    assert registry.alias("production") == v1
    assert registry.history()[-1]["action"] == "refused"
    with pytest.raises(RegistryError, match="reason"):
        registry.promote(blind, force=True)
    forced = registry.promote(blind, reason="emergency: golden set outdated", user="qa-lead", force=True)
    assert forced.promoted and forced.forced
    last = registry.history()[-1]
    assert last["action"] == "promote" and last["forced"] is True and last["reason"].startswith("emergency")


def test_first_promotion_must_meet_the_absolute_limits(known_export: Path, synth_store: Path, tmp_path: Path) -> None:
    reg = Registry.init(tmp_path / "reg-strict", RegistryConfig(golden_set=str(synth_store), max_false_reject_rate=0.5))
    strict = reg.register(_variant(known_export, tmp_path, "strict", reject=0.0))  # rejects every part
    report = reg.promote(strict, reason="first")
    assert not report.promoted and "false-reject rate 1.0000 (limit 0.5)" in report.reason
    assert reg.alias("production") is None


def test_gate_refuses_more_false_rejects_than_the_margin(
    registry: Registry, known_export: Path, tmp_path: Path
) -> None:
    v1 = registry.register(known_export)
    registry.promote(v1, reason="first", force=True)
    strict = registry.register(_variant(known_export, tmp_path, "strict", reject=0.0))  # rejects every part
    assert registry.golden_figures(strict).false_reject_rate == 1.0
    assert registry.golden_figures(strict).escape_rate == registry.golden_figures(v1).escape_rate == 0.0
    report = registry.promote(strict, reason="x")
    assert not report.promoted and "false-reject rate" in report.reason, report.reason
    assert registry.alias("production") == v1


def test_two_concurrent_promotions_leave_a_consistent_registry(
    registry: Registry, known_export: Path, tmp_path: Path
) -> None:
    base = registry.register(known_export)
    registry.promote(base, reason="first", force=True)
    a = registry.register(_variant(known_export, tmp_path, "a"))
    b = registry.register(_variant(known_export, tmp_path, "b"))
    registry.golden_figures(a), registry.golden_figures(b)  # warm the cache: the race is on the aliases
    barrier = threading.Barrier(2)

    def promote(version: str) -> None:
        barrier.wait()
        Registry(registry.root).promote(version, reason="race", force=True)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    aliases = registry.aliases()
    promotes = [h for h in registry.history() if h["action"] == "promote"]
    assert len(promotes) == 3
    # the history is a chain: each promotion's `from` is the one before it, and the aliases end on the last one
    assert promotes[1]["from"] == promotes[0]["version"] and promotes[2]["from"] == promotes[1]["version"]
    assert aliases == {"production": promotes[2]["version"], "previous": promotes[1]["version"]}
    assert not list(registry.root.glob(".*.tmp"))


def test_registry_needs_a_golden_set_to_gate(known_export: Path, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "bare")
    v = reg.register(known_export)
    with pytest.raises(RegistryError, match="golden set"):
        reg.promote(v, reason="no gate")
    assert reg.promote(v, reason="bootstrap without a golden set", force=True).promoted


def test_cli_list_promote_rollback(known_export: Path, synth_store: Path, tmp_path: Path, capsys) -> None:
    from inspection.cli import main

    root = str(tmp_path / "r")
    assert main(["registry", "--root", root, "init", "--golden-set", str(synth_store)]) == 0
    assert main(["registry", "--root", root, "register", str(known_export)]) == 0
    v = capsys.readouterr().out.strip().splitlines()[-1]
    main(["registry", "--root", root, "promote", v, "--force", "--reason", "cli"])
    capsys.readouterr()
    assert main(["registry", "--root", root, "list"]) == 0
    assert "production" in capsys.readouterr().out
    assert main(["registry", "--root", root, "rollback"]) == 1  # nothing to roll back to: a clear error
    assert "nothing to roll back" in capsys.readouterr().err
