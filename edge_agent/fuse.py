"""One ONNX graph holding both models of the ensemble behind one input.

onnxruntime then runs θ_bd and θ_aug in a single ``run`` call (one input copy, one dispatch, argmax inside
the graph), which on a small CPU is what brings the ensemble well ahead of two separate sessions (see
BENCHMARKS.md). Built at load from the bundle's two files; needs only the ``onnx`` package, not torch.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose, helper

from edge_agent.formats.reject import COMBINED, RejectRule

PRIMARY_OUT, MONITOR_OUT = "primary_label", "monitor_label"
SCORE_OUT, REJECTED_OUT, NONFINITE_OUT = "reject_score", "rejected", "nonfinite"


class FuseError(ValueError):
    """The two models cannot share one graph (different inputs or opsets); serve them separately."""


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _part_nodes(score: str, out: str) -> list[onnx.NodeProto]:
    """Nodes computing one plain score of :mod:`.formats.reject` into ``out`` (names kept apart per score)."""
    n = helper.make_node
    t = f"s/{score}/"  # this score's intermediate names
    if score == "disagree":
        return [
            n("Equal", [PRIMARY_OUT, MONITOR_OUT], [t + "same"]),
            n("Not", [t + "same"], [t + "differ"]),
            n("Cast", [t + "differ"], [out], to=onnx.TensorProto.FLOAT),
        ]
    if score == "kl":
        return [
            n("LogSoftmax", ["s/p"], [t + "lp"], axis=1),
            n("LogSoftmax", ["s/m"], [t + "lm"], axis=1),
            n("Exp", [t + "lp"], [t + "pp"]),
            n("Sub", [t + "lp", t + "lm"], [t + "d"]),
            n("Mul", [t + "pp", t + "d"], [t + "e"]),
            n("ReduceSum", [t + "e", "s/axes"], [out], keepdims=0),
        ]
    if score == "logit_gap":  # (p - m)[y] - mean(p - m); the label count from the shape (any opset >= 13)
        return [
            n("Sub", ["s/p", "s/m"], [t + "d"]),
            n("Unsqueeze", [PRIMARY_OUT, "s/axes"], [t + "idx"]),
            n("GatherElements", [t + "d", t + "idx"], [t + "dy2"], axis=1),
            n("Squeeze", [t + "dy2", "s/axes"], [t + "dy"]),
            n("ReduceSum", [t + "d", "s/axes"], [t + "sum"], keepdims=0),
            n("Shape", [t + "d"], [t + "shape"]),
            n("Gather", [t + "shape", "s/axes"], [t + "k1"], axis=0),
            n("Cast", [t + "k1"], [t + "k"], to=onnx.TensorProto.FLOAT),
            n("Div", [t + "sum", t + "k"], [t + "mean"]),
            n("Sub", [t + "dy", t + "mean"], [out]),
        ]
    # doubt
    return [
        n("Softmax", ["s/m"], [t + "pm"], axis=1),
        n("Unsqueeze", [PRIMARY_OUT, "s/axes"], [t + "idx"]),
        n("GatherElements", [t + "pm", t + "idx"], [t + "picked2"], axis=1),
        n("Squeeze", [t + "picked2", "s/axes"], [t + "picked"]),
        n("Sub", ["s/one", t + "picked"], [out]),
    ]


def _score_nodes(p_logits: str, m_logits: str, rule: RejectRule) -> list[onnx.NodeProto]:
    """Nodes computing ``reject_score`` (FLOAT, (batch,)) and ``rejected`` (BOOL) as :mod:`.formats.reject` does;
    a combined score is the largest of its parts, each divided by the rule's scale for it."""
    n = helper.make_node
    const = [
        n("Constant", [], ["s/axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])),
        n("Constant", [], ["s/tau"], value=helper.make_tensor("tau", onnx.TensorProto.FLOAT, [], [rule.threshold])),
        n("Constant", [], ["s/one"], value=helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])),
        n("Cast", [p_logits], ["s/p"], to=onnx.TensorProto.FLOAT),
        n("Cast", [m_logits], ["s/m"], to=onnx.TensorProto.FLOAT),
    ]
    parts = COMBINED.get(rule.score)
    if parts is None:
        return [*const, *_part_nodes(rule.score, SCORE_OUT), *_decision_nodes()]
    body: list[onnx.NodeProto] = []
    for part, scale in zip(parts, rule.scales, strict=True):
        c = f"s/{part}/scale"
        body += [
            n("Constant", [], [c], value=helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [scale])),
            *_part_nodes(part, f"s/{part}/raw"),
            n("Div", [f"s/{part}/raw", c], [f"s/{part}/scaled"]),
        ]
    body.append(n("Max", [f"s/{part}/scaled" for part in parts], [SCORE_OUT]))
    return [*const, *body, *_decision_nodes()]


def _decision_nodes() -> list[onnx.NodeProto]:
    """``nonfinite`` (BOOL, (batch,)): NaN or an infinity in either model's logits or in the score; ``rejected``:
    the score above τ, or nonfinite (fail closed). As :func:`.formats.reject.nonfinite`: the score plus 0 × the sum
    of both models' logits is finite exactly when all of them are (a few nodes, not one check per logit)."""
    n = helper.make_node
    return [
        n("ReduceSum", ["s/p", "s/axes"], ["s/psum"], keepdims=0),
        n("ReduceSum", ["s/m", "s/axes"], ["s/msum"], keepdims=0),
        n("Add", ["s/psum", "s/msum"], ["s/lsum"]),
        n("Constant", [], ["s/zero"], value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])),
        n("Mul", ["s/lsum", "s/zero"], ["s/lzero"]),
        n("Add", [SCORE_OUT, "s/lzero"], ["s/probe"]),
        n("IsNaN", ["s/probe"], ["s/nan"]),
        n("IsInf", ["s/probe"], ["s/inf"]),
        n("Or", ["s/nan", "s/inf"], [NONFINITE_OUT]),
        n("Greater", [SCORE_OUT, "s/tau"], ["s/above"]),
        n("Or", ["s/above", NONFINITE_OUT], [REJECTED_OUT]),
    ]


def fuse_models(primary: Path, monitor: Path, input_name: str, rule: RejectRule | None = None) -> bytes:
    """Serialised graph ``input_name -> (primary_label, monitor_label, reject_score, rejected, nonfinite)``: labels
    INT64, the score FLOAT and the flags BOOL, all of shape (batch,), under ``rule`` (default: the paper's)."""
    rule = rule or RejectRule()
    a, b = onnx.load(primary), onnx.load(monitor)
    if _opsets(a) != _opsets(b):
        raise FuseError(f"opsets differ: primary {_opsets(a)}, monitor {_opsets(b)}")
    inputs = []
    for role, m in (("primary", a), ("monitor", b)):
        names = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
        if names != [input_name] or len(m.graph.output) != 1:
            raise FuseError(f"{role} model has inputs {names} and {len(m.graph.output)} outputs; expected one each")
        inputs.append(m.graph.input[[i.name for i in m.graph.input].index(input_name)])
    if inputs[0].type != inputs[1].type:
        raise FuseError("the two models declare different input types")
    a, b = compose.add_prefix(a, "p/"), compose.add_prefix(b, "m/")
    nodes = [
        helper.make_node("Identity", [input_name], ["p/" + input_name]),
        helper.make_node("Identity", [input_name], ["m/" + input_name]),
        *a.graph.node,
        *b.graph.node,
        helper.make_node("ArgMax", [a.graph.output[0].name], [PRIMARY_OUT], axis=1, keepdims=0),
        helper.make_node("ArgMax", [b.graph.output[0].name], [MONITOR_OUT], axis=1, keepdims=0),
        *_score_nodes(a.graph.output[0].name, b.graph.output[0].name, rule),
    ]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, ["batch"]) for n in (PRIMARY_OUT, MONITOR_OUT)]
    outputs += [
        helper.make_tensor_value_info(SCORE_OUT, onnx.TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(REJECTED_OUT, onnx.TensorProto.BOOL, ["batch"]),
        helper.make_tensor_value_info(NONFINITE_OUT, onnx.TensorProto.BOOL, ["batch"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nnoc_ensemble",
        [inputs[0]],
        outputs,
        initializer=[*a.graph.initializer, *b.graph.initializer],
        value_info=[*a.graph.value_info, *b.graph.value_info],
    )
    fused = helper.make_model(graph, opset_imports=a.opset_import, ir_version=max(a.ir_version, b.ir_version))
    fused.functions.extend([*a.functions, *b.functions])
    try:
        onnx.checker.check_model(fused)
    except onnx.checker.ValidationError as e:
        raise FuseError(f"fused graph does not check: {e}") from e
    return fused.SerializeToString()
