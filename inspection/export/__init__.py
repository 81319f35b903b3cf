"""ONNX export with preprocessing and the CAM heatmap inside the graph, parity check, INT8 and FP16 variants."""

from inspection.export.config import ExportConfig
from inspection.export.onnx_export import ExportCheckError, ExportResult, export_net, export_onnx

__all__ = ["ExportCheckError", "ExportConfig", "ExportResult", "export_net", "export_onnx"]
