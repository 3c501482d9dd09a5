"""Derive every exported graph's shapes instead of writing them, and fold what is constant.

The tracer leaves a graph full of ``Shape -> Gather -> Concat`` chains and ``Constant`` nodes,
and ONNX's own shape inference cannot follow sizes through them (a ``TopK``'s K computed from a
``Shape``, say). Polygraphy folds the constants and shape subgraphs (with ONNX-GraphSurgeon and
ONNX Runtime), and ONNX Runtime's symbolic shape inference then derives each output's shape:
symbolic where an axis is dynamic (``batch_size``, ``Max(0, sequence_length - 26)``), a number
where the budget fixes it. :func:`derived_graph` checks the result against the contract and only
*names* the dynamic axes by it; a size it cannot derive, or derives differently from the traced
one, is an export error, never overwritten.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import onnx
import onnxruntime
import sympy
from onnx import helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_attribute, get_shape_from_value_info

from visiondrop_edge.contract import PAST, SEQ, TOTAL
from visiondrop_edge.plugins_trt import MERGE_OP, SELECT_OP
from visiondrop_edge.plugins_trt.onnx_ops import INT32, OUTPUT_TYPES, plugin_output_shapes

COUNT_ATTRIBUTE = {SELECT_OP: "k", MERGE_OP: "c"}


class ShapeDerivationError(RuntimeError):
    """An exported graph whose shapes ONNX Runtime's symbolic inference cannot derive, or derives
    differently from what the unit computed when traced: an exporter bug, not a user error."""


class _Inference(SymbolicShapeInference):
    """ONNX Runtime's symbolic shape inference, taught the plugin ops' shape rule and the
    contract's one relation between input axes: a decoder's attention mask covers the cache and
    the new tokens, ``total_sequence_length = past_sequence_length + sequence_length``. (Without
    it, the mask's length is an unrelated symbol and slicing the scores at the cache length is
    undecidable.) No dims are merged on a guess (``auto_merge`` off): an undecidable broadcast
    is an error."""

    def __init__(self):
        super().__init__(int_max=2**31 - 1, auto_merge=False, guess_output_rank=False, verbose=0)
        for op_type in COUNT_ATTRIBUTE:
            self.dispatcher_[op_type] = self._infer_plugin

    def _relate_total_to_past_and_new(self) -> None:
        # Through the inference's own merge table: input symbols found in it are replaced by the
        # expression at the start of every pass.
        past, new = (sympy.Symbol(name, integer=True, positive=True) for name in (PAST, SEQ))
        total = str(past + new)
        self.symbolic_dims_[total] = past + new
        self.suggested_merge_.update({TOTAL: total, total: total})

    def _infer_plugin(self, node: onnx.NodeProto) -> None:
        shapes = plugin_output_shapes(node.op_type, get_attribute(node, COUNT_ATTRIBUTE[node.op_type]),
                                      [self._get_shape(node, i) for i in range(len(node.input))])
        for name, source, shape in zip(node.output, OUTPUT_TYPES[node.op_type], shapes, strict=True):
            elem_type = onnx.TensorProto.INT32 if source == INT32 else self.known_vi_[node.input[source]].type.tensor_type.elem_type
            self.known_vi_[name].CopyFrom(helper.make_tensor_value_info(name, elem_type, shape))

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        # SymbolicShapeInference.infer_shapes without its side effect: on failure it writes
        # sym_shape_infer_temp.onnx into the working directory.
        self._preprocess(model)
        self._relate_total_to_past_and_new()
        complete = False
        while self.run_:
            complete = self._infer_impl()
        self._update_output_from_vi()
        if not complete:
            raise ShapeDerivationError(f"{model.graph.name}: ONNX Runtime's symbolic shape inference is incomplete")
        return self.out_mp_


class _UnprovableSliceStart(logging.Filter):
    """Drops the one note symbolic inference logs for the decoder's causal-mask ``Slice``: it cannot
    prove ``total_sequence_length - sequence_length >= 0`` (true by construction) and keeps the
    start as is, which is what a non-negative start means anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Cannot determine if")


@contextmanager
def _quiet_inference() -> Iterator[None]:
    from polygraphy.logger import G_LOGGER

    inference_log = logging.getLogger(SymbolicShapeInference.__module__)
    note_filter = _UnprovableSliceStart()
    inference_log.addFilter(note_filter)
    # The folding sessions' graph-optimizer notes ("UnsqueezeElimination cannot remove node"):
    # ONNX Runtime logs them at warning level for sessions with no severity of their own (every
    # session of this package sets one). 2 is ONNX Runtime's default, restored after.
    onnxruntime.set_default_logger_severity(3)
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # per-pass folding counts
            yield
    finally:
        onnxruntime.set_default_logger_severity(2)
        inference_log.removeFilter(note_filter)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every tensor's shape derived (value_info filled in)."""
    with _quiet_inference():
        return _Inference().run(model)


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and shape subgraphs, deriving shapes before every pass (with the plugins'
    rule, so plugin-mode graphs fold as far as portable ones), until a pass changes nothing."""
    from polygraphy.backend.onnx import fold_constants

    with _quiet_inference():
        while True:
            nodes = len(model.graph.node)
            model = fold_constants(_Inference().run(model), num_passes=1, do_shape_inference=False, fold_shapes=True,
                                   partitioning=None, error_ok=False)
            if len(model.graph.node) == nodes:
                return _Inference().run(model)


def derived_graph(model: onnx.ModelProto, declared: dict[str, tuple[list[int], dict[int, str]]]) -> onnx.ModelProto:
    """Fold ``model`` and derive its output shapes, then check them against ``declared``: per
    output, its traced sizes and its dynamic axes by the contract. A static axis must come out as
    that number; a dynamic one must come out symbolic, and is then given the contract's name."""
    inputs = [onnx.ValueInfoProto.FromString(value.SerializeToString()) for value in model.graph.input]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    model = fold(model)
    del model.graph.input[:]
    model.graph.input.extend(inputs)  # as declared: inference renames total_sequence_length to its sum
    problems = []
    for output in model.graph.output:
        sizes, dynamic = declared[output.name]
        derived = get_shape_from_value_info(output)
        if len(derived) != len(sizes):
            problems.append(f"{output.name}: derived rank {len(derived)}, traced {len(sizes)}")
            continue
        for axis, (got, size) in enumerate(zip(derived, sizes)):
            if axis in dynamic:
                if not isinstance(got, str):
                    problems.append(f"{output.name} axis {axis}: derived {got}, but the contract says dynamic ({dynamic[axis]})")
            elif got != size:
                problems.append(f"{output.name} axis {axis}: derived {got}, traced {size}")
        if not problems:
            for axis, dim in enumerate(output.type.tensor_type.shape.dim):
                if axis in dynamic:
                    dim.dim_param = dynamic[axis]
    if problems:
        raise ShapeDerivationError(f"{model.graph.name}: " + "; ".join(problems))
    return model
