"""The client-facing model of a ``visiondrop triton-repo`` repository, copied there as ``visiondrop/1/model.py``.

It runs inside Triton's Python backend (it imports ``triton_python_backend_utils``, which only
Triton provides) and needs visiondrop-edge installed in the Python the backend runs. Triton's
dynamic batcher hands it a batch of requests; each is checked alone (a bad one gets its own
error response), then the good ones are answered together by :func:`~.serve.answer_batch` on a
:class:`~.session.Session` whose units are BLS requests to the repository's unit models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from visiondrop_edge.errors import UserError
from visiondrop_edge.runtime.base import ModelSpec
from visiondrop_edge.runtime.serve import RequestChecker, ServeOptions, answer_batch, reply_arrays, request_rows
from visiondrop_edge.runtime.session import Session
from visiondrop_edge.runtime.triton_repo import SETTINGS, UnitBackend


def call_unit(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One BLS request to a unit model; its error, if any, fails the batch."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs,
                                        inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()])
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"unit model {model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def column(request, name: str, rows: int | None = None) -> list:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:  # an optional input left out
        return [None] * rows
    return [row[0] for row in tensor.as_numpy()]


class TritonPythonModel:
    def initialize(self, args):
        from safetensors.torch import load_file
        from transformers import AutoProcessor

        folder = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((folder / SETTINGS).read_text())
        spec = ModelSpec.from_dict(settings["spec"])
        embed = load_file(folder / "embed_tokens.safetensors")["weight"]
        processor = AutoProcessor.from_pretrained(folder / "processor")
        options = ServeOptions(**settings["serve"])
        backend = UnitBackend(spec, settings["units"], embed, call_unit)
        self.session = Session(backend, processor, settings["model_id"], options.prefix_cache_bytes)
        self.checker = RequestChecker(processor, spec, tuple(settings["limit"]), options)
        self.pad = spec.pad_token_id

    def execute(self, requests):
        responses = [None] * len(requests)
        rows, owners = [], []
        for number, request in enumerate(requests):
            images = column(request, "image")
            try:
                mine = request_rows(self.checker, images, column(request, "prompt"),
                                    column(request, "max_new_tokens", len(images)))
            except UserError as exc:
                responses[number] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            rows += mine
            owners += [number] * len(mine)
        if rows:
            try:
                replies = answer_batch(self.session, rows)
            except Exception as exc:  # a unit failed: every request of the batch learns why
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                return [r or pb_utils.InferenceResponse(error=error) for r in responses]
            for number in sorted(set(owners)):
                arrays = reply_arrays([reply for reply, owner in zip(replies, owners) if owner == number], self.pad)
                responses[number] = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in arrays.items()])
        return responses
