"""Our gRPC service is wire-compatible with what tritonclient.grpc sends (Triton's grpc_service.proto).

Both define package ``inference`` with the same names; ours lives in a descriptor pool of its own
(scripts/gen_grpc.py), so both load here and are compared field by field.
"""
from __future__ import annotations

import numpy as np
import pytest

from modelpool.gateway import grpc_predict_v2_pb2 as pb

service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")


def _fields(message) -> dict:
    out = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
           for f in message.fields}
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            out.update({f"{nested.name}.{k}": v for k, v in _fields(nested).items()})
    return out


def test_every_method_and_field_matches_tritons():
    ours, theirs = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], \
        service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    triton_methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in theirs.methods}
    assert {m.name for m in ours.methods} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                              "ModelMetadata", "ModelInfer", "ModelStatistics"}
    for method in ours.methods:
        assert triton_methods[method.name] == (method.input_type.full_name, method.output_type.full_name)
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        triton_fields = _fields(service_pb2.DESCRIPTOR.message_types_by_name[name])
        for field, spec in _fields(message).items():
            assert triton_fields.get(field) == spec, f"{name}.{field}: ours {spec}, tritonclient's {triton_fields.get(field)}"


def test_a_request_tritonclient_builds_parses_as_ours():
    x = np.arange(6, dtype="<f4")
    theirs = service_pb2.ModelInferRequest(model_name="m", model_version="2", id="r", raw_input_contents=[x.tobytes()])
    theirs.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    theirs.outputs.add(name="y").parameters["binary_data"].bool_param = True
    theirs.parameters["timeout"].int64_param = 5000
    theirs.parameters["ratio"].double_param = 0.5
    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    assert (ours.model_name, ours.model_version, ours.id) == ("m", "2", "r")
    assert list(ours.inputs[0].shape) == [2, 3] and ours.raw_input_contents[0] == x.tobytes()
    assert ours.parameters["timeout"].int64_param == 5000 and ours.parameters["ratio"].double_param == 0.5
    assert ours.outputs[0].parameters["binary_data"].bool_param
