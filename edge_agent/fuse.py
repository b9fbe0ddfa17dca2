"""One ONNX graph holding both models of the ensemble behind one input.

onnxruntime then runs θ_bd and θ_aug in a single ``run`` call (one input copy, one dispatch, argmax inside
the graph), which on a small CPU is what brings the ensemble well ahead of two separate sessions (see
BENCHMARKS.md). Built at load from the bundle's two files; needs only the ``onnx`` package, not torch.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose, helper

from edge_agent.formats.reject import RejectRule

PRIMARY_OUT, MONITOR_OUT = "primary_label", "monitor_label"
SCORE_OUT, REJECTED_OUT = "reject_score", "rejected"


class FuseError(ValueError):
    """The two models cannot share one graph (different inputs or opsets); serve them separately."""


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _score_nodes(p_logits: str, m_logits: str, rule: RejectRule) -> list[onnx.NodeProto]:
    """Nodes computing ``reject_score`` (FLOAT, (batch,)) and ``rejected`` (BOOL) as :mod:`.formats.reject` does."""
    n = helper.make_node
    const = [
        n("Constant", [], ["s/axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])),
        n("Constant", [], ["s/tau"], value=helper.make_tensor("tau", onnx.TensorProto.FLOAT, [], [rule.threshold])),
        n("Constant", [], ["s/one"], value=helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])),
        n("Cast", [p_logits], ["s/p"], to=onnx.TensorProto.FLOAT),
        n("Cast", [m_logits], ["s/m"], to=onnx.TensorProto.FLOAT),
    ]
    if rule.score == "disagree":
        body = [
            n("Equal", [PRIMARY_OUT, MONITOR_OUT], ["s/same"]),
            n("Not", ["s/same"], ["s/differ"]),
            n("Cast", ["s/differ"], [SCORE_OUT], to=onnx.TensorProto.FLOAT),
        ]
    elif rule.score == "kl":
        body = [
            n("LogSoftmax", ["s/p"], ["s/lp"], axis=1),
            n("LogSoftmax", ["s/m"], ["s/lm"], axis=1),
            n("Exp", ["s/lp"], ["s/pp"]),
            n("Sub", ["s/lp", "s/lm"], ["s/d"]),
            n("Mul", ["s/pp", "s/d"], ["s/e"]),
            n("ReduceSum", ["s/e", "s/axes"], [SCORE_OUT], keepdims=0),
        ]
    elif rule.score == "logit_gap":  # (p - m)[y] - mean(p - m); the label count from the shape (any opset >= 13)
        body = [
            n("Sub", ["s/p", "s/m"], ["s/d"]),
            n("Unsqueeze", [PRIMARY_OUT, "s/axes"], ["s/idx"]),
            n("GatherElements", ["s/d", "s/idx"], ["s/dy2"], axis=1),
            n("Squeeze", ["s/dy2", "s/axes"], ["s/dy"]),
            n("ReduceSum", ["s/d", "s/axes"], ["s/sum"], keepdims=0),
            n("Shape", ["s/d"], ["s/shape"]),
            n("Gather", ["s/shape", "s/axes"], ["s/k1"], axis=0),
            n("Cast", ["s/k1"], ["s/k"], to=onnx.TensorProto.FLOAT),
            n("Div", ["s/sum", "s/k"], ["s/mean"]),
            n("Sub", ["s/dy", "s/mean"], [SCORE_OUT]),
        ]
    else:  # doubt
        body = [
            n("Softmax", ["s/m"], ["s/pm"], axis=1),
            n("Unsqueeze", [PRIMARY_OUT, "s/axes"], ["s/idx"]),
            n("GatherElements", ["s/pm", "s/idx"], ["s/picked2"], axis=1),
            n("Squeeze", ["s/picked2", "s/axes"], ["s/picked"]),
            n("Sub", ["s/one", "s/picked"], [SCORE_OUT]),
        ]
    return [*const, *body, n("Greater", [SCORE_OUT, "s/tau"], [REJECTED_OUT])]


def fuse_models(primary: Path, monitor: Path, input_name: str, rule: RejectRule | None = None) -> bytes:
    """Serialised graph ``input_name -> (primary_label, monitor_label, reject_score, rejected)``: labels INT64,
    the score FLOAT and the reject flag BOOL, all of shape (batch,), under ``rule`` (default: the paper's)."""
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
