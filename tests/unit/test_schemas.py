from inspection.schemas import InspectionResult, stale_schemas
from tests.conftest import REPO_ROOT


def test_committed_schemas_are_current():
    stale = stale_schemas(REPO_ROOT / "data_schemas")
    assert stale == [], f"run `inspection schemas export`: stale {stale}"


def test_stale_file_is_detected(tmp_path):
    from inspection.schemas import export_schemas

    export_schemas(tmp_path)
    (tmp_path / "model_card.json").write_text("{}\n")
    assert stale_schemas(tmp_path) == ["model_card.json"]


def test_inspection_result_rejects_unknown_verdict():
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        InspectionResult(
            request_id="r", part_id="p", station="s", timestamp="2026-01-01T00:00:00Z", verdict="maybe", latency_ms=1
        )
