"""Human labels on graph nodes. They live in `graph.labels` (node index -> text), are saved with the graph,
survive pruning, and win over automatic labels in the SVG and the viewer."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .graph import AttributionGraph, load_graph


def node_index(graph: AttributionGraph, node: str | int) -> int:
    """The index of a node given as a node id (`f:3:5:1021`) or an index."""
    if isinstance(node, int) or (isinstance(node, str) and node.isdigit()):
        i = int(node)
        if not 0 <= i < graph.n_nodes:
            raise UserError(f"node index {i} is outside 0..{graph.n_nodes - 1}")
        return i
    return graph.index_of(str(node))


def set_label(graph: AttributionGraph, node: str | int, text: str) -> int:
    """Label `node`; returns its index."""
    text = str(text).strip()
    if not text:
        raise UserError("the label is empty; give some text, or remove the label instead")
    i = node_index(graph, node)
    graph.labels[i] = text
    return i


def remove_label(graph: AttributionGraph, node: str | int) -> bool:
    """Drop `node`'s label; returns whether it had one."""
    return graph.labels.pop(node_index(graph, node), None) is not None


def labels_by_id(graph: AttributionGraph) -> dict[str, str]:
    return {graph.node_id(i): text for i, text in sorted(graph.labels.items())}


def label_file(path: str | Path, node: str | int, text: str | None) -> AttributionGraph:
    """Label (or with text None, unlabel) a node of the graph saved at `path`, and save it back."""
    graph = load_graph(path)
    if text is None:
        if not remove_label(graph, node):
            raise UserError(f"node {node} has no label")
    else:
        set_label(graph, node, text)
    graph.save(path)
    return graph
