"""OPC UA for the PLC: trigger and result handshake (OPC 40100 style), secure by default (see server.py).

`OpcUaServer(runtime)` is built by `Runtime.build` when `opcua.endpoint` is set and started/stopped with it.
"""

from inspection.runner.opcua.server import OUTPUTS, RESULT_FIELDS, STATE_CODES, VERDICT_CODES, OpcUaServer

__all__ = ["OUTPUTS", "RESULT_FIELDS", "STATE_CODES", "VERDICT_CODES", "OpcUaServer"]
