"""What a graph says about its nodes beyond the numbers: human labels and feature dashboards.

Human labels live in `graph.labels` (node index -> text), are saved with the graph, survive pruning,
and win over automatic labels in the SVG and the viewer. Dashboards (`transcoders.dashboards`) are
copied into the graph's metadata for its features (`attach_dashboards`: `circuits trace` does it for
every graph; this is for graphs traced without them), so every later file carries them."""

from __future__ import annotations

from pathlib import Path

from gemma_lm.errors import UserError
from transcoders.dashboards import Dashboards, load_dashboards

from .graph import AttributionGraph, load_graph
from .graph import attach_dashboards as attach_to_graph


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


def attach_dashboards(graph, dashboards: Dashboards | str | Path, n_contexts: int = 5) -> int:
    """Put the dashboard of every feature of `graph`'s feature nodes into the graph (a
    `Dashboards` or its folder; see `circuits.graph.attach_dashboards`). Returns how many feature
    nodes got one."""
    d = dashboards if isinstance(dashboards, Dashboards) else load_dashboards(dashboards)
    return attach_to_graph(graph, d, n_contexts=n_contexts)
