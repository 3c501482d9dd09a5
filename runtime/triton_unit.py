"""One exported ONNX graph on ONNX Runtime inside Triton's Python backend, copied as ``<unit>/1/model.py``
by ``visiondrop triton-repo --units python``.

For a Triton without the ONNX Runtime backend (such as the one in the ``nvidia-pytriton`` wheel).
It imports only numpy and onnxruntime, and applies the ONNX Runtime settings the config
carries, as ``runtime/ort_backend.py`` builds them: ``session_config`` (the unit's thread-pool
settings per graph role, then a calibrated folder's) and ``disabled_optimizers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        for key, value in json.loads(parameters.get("session_config", "{}")).items():
            options.add_session_config_entry(key, value)
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        disabled = json.loads(parameters.get("disabled_optimizers", "[]")) or None
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"],
                                                    disabled_optimizers=disabled)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            wanted = request.requested_output_names() or self.outputs
            results = self.session.run(wanted, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, r) for n, r in zip(wanted, results)]))
        return responses
