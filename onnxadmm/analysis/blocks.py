"""Blocks for block-wise refinement: stretches of the graph between cut tensors.

A tensor t is a cut when, right after its producer in topological order, t is the only live
(non-constant) tensor: everything later depends on the earlier graph only through t. In a ResNet the
cuts are the residual stream after each block; in a plain chain, every layer output. Consecutive
stretches are merged until each block holds at least ``min_nodes`` of the nodes to refine, so a block
spans a whole residual block (or a whole inverted-residual block) rather than one conv; a stretch
holding none joins the block before it, so a block ends after the activation that follows it.
Constant subexpressions (Constant nodes, ops on initializers only) are copied into each block that
reads them.

Tensors computed from the graph inputs by nodes outside the refined set — a transformer's attention mask
expanded once and read by every encoder layer — are the same in the original and the compressed model.
They are *side inputs*: they may stay live across a cut (the cut is then the one other live tensor) and
enter each later block as an extra input, never as an output to fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..onnxio.graph import GraphView, node_inputs


@dataclass
class Block:
    node_ids: list[int]  # topological order, constant ancestors included
    inputs: list[str]  # live tensors entering the block (graph inputs for the first)
    outputs: list[str]  # the cut tensor leaving it (the graph outputs for the last)
    counted: list[int]  # the nodes to refine inside it
    sides: list[str] = field(default_factory=list)  # side inputs among ``inputs`` (see the module docstring)

    @property
    def name(self) -> str:
        return f"{self.inputs[0]} -> {self.outputs[0]}"


def constant_nodes(view: GraphView) -> set[int]:
    """Nodes whose every input is an initializer or another constant node's output."""
    constant_tensors = set(view.initializers) | {""}
    nodes = set()
    for index in view.order:
        node = view.nodes[index]
        if all(name in constant_tensors for name in node_inputs(node)):
            nodes.add(index)
            constant_tensors.update(o for o in node.output if o)
    return nodes


def side_tensors(view: GraphView, counted: set[int], constants: set[int]) -> set[str]:
    """The graph inputs, and every tensor computed from them (and constants) by nodes not in ``counted``
    and not downstream of one."""
    sides = set(view.input_names)
    known = set(view.initializers) | {""} | sides
    for index in view.order:
        node = view.nodes[index]
        outputs = {o for o in node.output if o}
        if index in constants:
            known |= outputs
        elif index not in counted and all(name in known for name in node_inputs(node)):
            sides |= outputs
            known |= outputs
    return sides


def find_blocks(view: GraphView, counted: set[int], min_nodes: int = 2, cuts: set[str] | None = None
                ) -> list[Block]:
    """The graph split at cut tensors into blocks each holding ≥ ``min_nodes`` of the ``counted`` nodes
    (the last block may hold fewer); with ``cuts``, only those tensors may be cut (the original model's,
    so that a block never ends inside a factorized layer's nodes). A tensor is a cut when it is the only
    live tensor, or the only one besides side inputs."""
    constants = constant_nodes(view)
    sides = side_tensors(view, counted, constants)
    order = [i for i in view.order if i not in constants]
    remaining: dict[str, int] = {}
    for index in order:
        for name in node_inputs(view.nodes[index]):
            if name and name not in view.initializers and view.producer.get(name) not in constants:
                remaining[name] = remaining.get(name, 0) + 1
    outputs = set(view.output_names)
    live = {name for name in view.input_names if remaining.get(name)}
    stretches: list[tuple[list[int], list[str], list[str]]] = []
    current: list[int] = []
    entering = _main_first(live, sides)
    for position, index in enumerate(order):
        node = view.nodes[index]
        current.append(index)
        for name in node_inputs(node):
            if name in remaining:
                remaining[name] -= 1
                if remaining[name] == 0 and name not in outputs:
                    live.discard(name)
        live.update(o for o in node.output if o and (remaining.get(o) or o in outputs))
        last = position == len(order) - 1
        main = live if len(live) == 1 else live - sides
        if last or (len(main) == 1 and not (live & outputs) and (cuts is None or main <= cuts)):
            leaving = list(view.output_names) if last else sorted(main)
            stretches.append((current, entering, leaving))
            current, entering = [], _main_first(live, sides)
    blocks: list[Block] = []
    for ids, entering, leaving in stretches:
        inside = [i for i in ids if i in counted]
        if blocks and (len(blocks[-1].counted) < min_nodes or not inside):
            previous = blocks[-1]
            previous.node_ids += ids
            previous.outputs = leaving
            previous.counted += inside
        else:
            blocks.append(Block(list(ids), entering, leaving, inside))
    for block in blocks:
        block.node_ids = with_constants(view, block.node_ids, constants)
        block.sides = [name for name in block.inputs[1:] if name in sides]
    return blocks


def _main_first(live: set[str], sides: set[str]) -> list[str]:
    """The live tensors entering a block: the cut first, then the side inputs."""
    return sorted(live - sides) + sorted(live & sides) if len(live) > 1 else sorted(live)


def with_constants(view: GraphView, node_ids, constants: set[int]) -> list[int]:
    """``node_ids`` plus the constant nodes they read from, in topological order."""
    chosen = set(node_ids)
    needed = view.ancestors([t for i in chosen for t in node_inputs(view.nodes[i])],
                            stop=set(range(len(view.nodes))) - constants)
    chosen |= needed
    return [i for i in view.order if i in chosen]


def nodes_between(view: GraphView, inputs: list[str], outputs: list[str],
                  constants: set[int] | None = None) -> list[int] | None:
    """The nodes computing ``outputs`` from ``inputs`` (and constants) in ``view``, or None when the
    outputs depend on the graph before the inputs through anything else (not a cut in this graph).
    ``constants``: ``constant_nodes(view)``, if the caller has it."""
    if any(t not in view.producer and t not in view.input_names for t in outputs):
        return None
    constants = constant_nodes(view) if constants is None else constants
    before = view.ancestors(inputs) - constants
    nodes = view.ancestors(outputs) - before
    produced = {o for i in nodes for o in view.nodes[i].output if o}
    for index in nodes:
        for name in node_inputs(view.nodes[index]):
            if name not in produced and name not in view.initializers and name not in inputs:
                return None
    return [i for i in view.order if i in nodes]
