"""Small tools for rewriting an ONNX graph: who makes and reads each value, running a piece
of a graph on its own, and putting a rewritten node list back in order."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Container, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.ort_runtime import ort

if TYPE_CHECKING:  # onnx itself is imported only when a graph is rewritten (see decoder.py)
    import onnx

MS_DOMAIN = "com.microsoft"


class FusionUnsupported(Exception):
    """The graph is not one a rewrite knows and reproduces; it is kept as it is."""


def rewrite_error(want: np.ndarray, got: np.ndarray) -> float:
    """How far a rewrite's output is from the graph's, relative to the output's scale (taken
    as at least 1); infinite when the shapes differ, NaN when either holds a NaN."""
    if want.shape != got.shape:
        return math.inf
    scale = max(1.0, float(np.abs(want).max()))
    return float(np.abs(want.astype(np.float32) - got.astype(np.float32)).max()) / scale


def allowed_error(dtype: np.dtype) -> float:
    """The rewrite_error a rewrite may make: float rounding, in the graph's precision."""
    return 1e-2 if dtype == np.float16 else 1e-4


def reads(node: onnx.NodeProto) -> set[str]:
    """The values `node` reads: its inputs, and those its subgraphs (If, Loop, Scan bodies)
    take from outside. Empty names (absent optional inputs) are not values."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = {out for inner_node in graph.node for out in inner_node.output}
            inner |= {value.name for value in graph.input} | {init.name for init in graph.initializer}
            names |= {name for inner_node in graph.node for name in reads(inner_node) if name not in inner}
    return names


class GraphIndex:
    """Who produces and who reads each value of an onnx GraphProto. Graph outputs count as
    read. Holds every node's wrapper, so id(node) is stable while the index lives."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.producer: dict[str, onnx.NodeProto] = {out: node for node in self.nodes for out in node.output if out}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in reads(node):
                self.readers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}
        self.initializers = {init.name: init for init in graph.initializer}

    def read_only_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The one node reading `name`, if it is an `op_type` and `name` is no graph output."""
        readers = self.readers.get(name, [])
        if name in self.outputs or len(readers) != 1 or readers[0].op_type != op_type:
            return None
        return readers[0]

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            raise FusionUnsupported(f"{name} is not made by a {op_type}")
        return node

    def upstream(self, names: Iterable[str], stop: Container[str] = frozenset()) -> list[onnx.NodeProto]:
        """Nodes that `names` depend on, not looking past the values in `stop`."""
        seen: dict[int, onnx.NodeProto] = {}
        queue = deque(n for n in names if n not in stop)
        while queue:
            node = self.producer.get(queue.popleft())
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            queue.extend(n for n in reads(node) if n not in stop)
        return list(seen.values())


def attribute(node: onnx.NodeProto, name: str) -> Any:
    """The value of `node`'s attribute `name` (an int, a list of ints, a graph...), or None."""
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return None


def single(found: set[str], what: str) -> str:
    if len(found) != 1:
        raise FusionUnsupported(f"expected one {what}, found {len(found)}")
    return next(iter(found))


def ms_opset_if_missing(opsets: Iterable[onnx.OperatorSetIdProto]) -> list[onnx.OperatorSetIdProto]:
    """The com.microsoft opset import that `opsets` lacks for contrib ops, or nothing."""
    from onnx import helper

    return [] if any(op.domain == MS_DOMAIN for op in opsets) else [helper.make_opsetid(MS_DOMAIN, 1)]


def small_session(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[str],
    initializers: list[onnx.TensorProto],
) -> ort.InferenceSession:
    """An ORT session on a few of `model`'s nodes (or new ones), on the CPU provider: for
    computing tables with the graph's own nodes, and for checking a rewrite against them."""
    from onnx import helper

    graph = helper.make_graph(
        nodes, "probe", inputs, [helper.make_empty_tensor_value_info(name) for name in outputs], initializers
    )
    opsets = [*model.opset_import, *ms_opset_if_missing(model.opset_import)]
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a probe ORT refuses to run is an answer, not an error to log
    probe = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cut_session(
    model: onnx.ModelProto, graph: GraphIndex, outputs: list[str], boundary: dict[str, int]
) -> ort.InferenceSession:
    """A session computing `outputs` with `model`'s own nodes, fed at the `boundary` values
    (name -> onnx element type) and the graph inputs those nodes read."""
    from onnx import helper

    nodes = graph.upstream(outputs, set(boundary))
    made = {name for node in nodes for name in node.output}
    read = {name for node in nodes for name in reads(node) if name not in made}
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    inputs = [value for value in model.graph.input if value.name in read and value.name not in boundary]
    inputs += [helper.make_tensor_value_info(name, kind, None) for name, kind in boundary.items()]
    initializers = [graph.initializers[name] for name in sorted(read) if name in graph.initializers]
    return small_session(model, sorted(nodes, key=lambda n: order[id(n)]), inputs, outputs, initializers)


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes the graph's outputs need, each after the producers of what it reads."""
    producer = {out: node for node in nodes for out in node.output if out}
    needs = {id(node): {name for name in reads(node) if name in producer} for node in nodes}
    needed: set[int] = set()
    stack = [producer[o.name] for o in graph.output if o.name in producer]
    while stack:
        node = stack.pop()
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(producer[name] for name in needs[id(node)])
    kept = [node for node in nodes if id(node) in needed]
    waiting = {id(node): len(needs[id(node)]) for node in kept}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in kept:
        for name in needs[id(node)]:
            readers.setdefault(name, []).append(node)
    ready = deque(node for node in kept if waiting[id(node)] == 0)
    order: list[onnx.NodeProto] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for out in node.output:
            for reader in readers.get(out, []) if out else []:
                waiting[id(reader)] -= 1
                if waiting[id(reader)] == 0:
                    ready.append(reader)
    if len(order) != len(kept):
        raise FusionUnsupported("the rewritten graph has a cycle")
    return order


def replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` the graph's nodes: those its outputs need, each after the producers of what
    it reads; initializers no node reads any more go (with their graph input, if declared as
    one). Raises before changing anything if the nodes cannot be ordered."""
    nodes = _topological(nodes, model.graph)
    used = {name for node in nodes for name in reads(node)} | {value.name for value in model.graph.output}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    unused = {init.name for init in model.graph.initializer if init.name not in used}
    for container in (model.graph.initializer, model.graph.input):
        for item in [item for item in container if item.name in unused]:
            container.remove(item)
