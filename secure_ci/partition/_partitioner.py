"""The runtime half of the split engine: cut points of any traceable torch model.

:class:`Partitioner` traces the model with torch.fx, runs it once on the example inputs, and
enumerates every cut position in topological order with the tensors that cross it, in one
live-set sweep (O(nodes x boundary)). A second run with one more example row finds which
dimension of each tensor is the batch (:attr:`TensorSpec.batch_dim`; not always the first).
Nodes that do not depend on the inputs (parameters, constants and what is computed from them
alone) never cross a cut: each side recomputes what it needs. :meth:`Partitioner.split`
builds the head and tail modules for one cut on demand and checks them against the model on
the example inputs, so a wrong split is never returned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from secure_ci.exceptions import PartitionError
from secure_ci.partition._guard import running
from secure_ci.partition._plan import Cut, TensorSpec
from secure_ci.partition._stage import Stage
from secure_ci.partition._trace import (
    analyse,
    brief,
    fetch,
    model_id,
    outputs_match,
    spec_of,
    trace,
)

__all__ = ["Partitioner"]

_NOT_COMPUTE = frozenset({"placeholder", "get_attr", "output"})


class Partitioner:
    """Cut points of ``model`` on ``example_inputs``; the model is analysed in eval mode."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> None:
        if not isinstance(model, nn.Module):
            raise PartitionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (
            not isinstance(example_inputs, tuple)
            or not example_inputs
            or not all(isinstance(t, torch.Tensor) for t in example_inputs)
        ):
            raise PartitionError("example_inputs must be a non-empty tuple of tensors")
        model.eval()
        self._model = model
        self._inputs = tuple(t.detach() for t in example_inputs)
        self._input_specs = tuple(spec_of(t) for t in self._inputs)
        traced = trace(model, self._clone_inputs())
        self._gm, self._exported, self._out_spec = traced.gm, traced.exported, traced.out_spec
        self._placeholders = [n for n in self._gm.graph.nodes if n.op == "placeholder"]
        if len(self._placeholders) != len(self._inputs):
            raise PartitionError(
                f"{type(model).__name__}.forward takes {len(self._placeholders)} inputs, "
                f"got {len(self._inputs)} example inputs"
            )
        self._records, traced_out = analyse(self._gm, self._clone_inputs())
        try:
            with running(), torch.no_grad():
                self._reference = model(*self._clone_inputs())
        except Exception as exc:  # the model's own forward: translate anything
            raise PartitionError(f"model fails on the example inputs: {brief(exc)}") from exc
        if not outputs_match(self._reference, traced_out):
            raise PartitionError(
                "the traced graph does not reproduce the model output "
                "(randomness, hidden state or Python-level side effects in forward?)"
            )
        self._free = self._batch_dims()
        self._input_specs = tuple(
            dataclasses.replace(spec, batch_dim=self._batch_dim(p))
            for spec, p in zip(self._input_specs, self._placeholders, strict=True)
        )
        self._enumerate()

    # -- analysis ---------------------------------------------------------------------------

    def _enumerate(self) -> None:
        nodes: list[fx.Node] = list(self._gm.graph.nodes)
        self._dependent: set[fx.Node] = set(self._placeholders)
        for n in nodes:
            if n.op not in _NOT_COMPUTE and any(a in self._dependent for a in n.all_input_nodes):
                self._dependent.add(n)
        self._positions = [n for n in nodes if n.op not in _NOT_COMPUTE and n in self._dependent]
        end = len(self._positions)
        position = {n: i for i, n in enumerate(self._positions)}
        position.update({p: -1 for p in self._placeholders})
        last_use = {
            n: max((end if u.op == "output" else position[u] for u in n.users), default=-1)
            for n in position
        }
        # Live-set sweep: a value is live at cut i if defined at or before i and used after i.
        expire: list[list[fx.Node]] = [[] for _ in range(end + 1)]
        live: dict[fx.Node, None] = {}
        for p in self._placeholders:
            if last_use[p] >= 0:
                live[p] = None
                expire[last_use[p]].append(p)
        candidates: list[tuple[int, tuple[fx.Node, ...]]] = []
        for i, n in enumerate(self._positions[:-1]):
            if last_use[n] > i:
                live[n] = None
                expire[last_use[n]].append(n)
            for gone in expire[i]:
                live.pop(gone, None)
            boundary = tuple(live)
            # Only tensors may cross (a Python int or tuple crossing makes the cut invalid).
            if boundary and all(self._records[b].is_tensor for b in boundary):
                candidates.append((i, boundary))
        self._cut_nodes = candidates
        flops = _cumsum([self._records[n].flops for n in self._positions])
        params = self._cumulative_params()
        self.total_flops = flops[-1] if flops else 0
        self.total_params = params[-1] if params else 0
        sizes = [4 * sum(self._spec(b).numel for b in bnd) for _, bnd in candidates]
        marks = _bottlenecks(sizes, 4 * sum(s.numel for s in self._input_specs))
        self._cuts = tuple(
            Cut(
                index=k,
                name=self._positions[i].name,
                boundary=tuple(self._spec(b) for b in bnd),
                boundary_names=tuple(b.name for b in bnd),
                nbytes=sizes[k],
                head_flops_share=_share(flops[i], self.total_flops),
                head_params_share=_share(params[i], self.total_params),
                bottleneck=marks[k],
            )
            for k, (i, bnd) in enumerate(candidates)
        )

    def _batch_dims(self) -> dict[fx.Node, frozenset[int]]:
        """Dimensions that follow the batch size, found by a run with one more example row.

        Empty (every dimension fixed) when the model is not batch-polymorphic or was
        exported (torch.export specialises the graph to the example shapes).
        """
        if self._exported or any(t.dim() == 0 or t.shape[0] == 0 for t in self._inputs):
            return {}
        try:
            grown, _ = analyse(self._gm, tuple(torch.cat([t, t[:1]]) for t in self._inputs))
        except PartitionError:
            return {}
        free = {}
        for n, record in self._records.items():
            other = grown.get(n)
            if record.spec is not None and other is not None and other.spec is not None:
                a, b = record.spec.shape, other.spec.shape
                if len(a) == len(b):
                    free[n] = frozenset(k for k in range(len(a)) if a[k] != b[k])
        return free

    def _free_dims(self, nodes: Sequence[fx.Node]) -> tuple[frozenset[int], ...]:
        return tuple(self._free.get(n, frozenset()) for n in nodes)

    def _batch_dim(self, n: fx.Node) -> int | None:
        """The one dimension of ``n`` that follows the batch size, or None (none, or several:
        such a tensor cannot be split back into samples)."""
        free = self._free.get(n, frozenset())
        return next(iter(free)) if len(free) == 1 else None

    def _spec(self, n: fx.Node) -> TensorSpec:
        """The spec of a boundary tensor, with its batch dimension."""
        spec = self._records[n].spec
        if spec is None:  # pragma: no cover - only tensors are ever asked for
            raise PartitionError(f"node {n.name} is not a tensor")
        return dataclasses.replace(spec, batch_dim=self._batch_dim(n))

    def _constant_params(self, n: fx.Node, seen: dict[int, int]) -> None:
        """Parameters touched by ``n`` and by the constant nodes it reads from."""
        stack = [n]
        visited: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in visited:
                continue
            visited.add(node)
            seen.update(self._records[node].params)
            stack.extend(a for a in node.all_input_nodes if a not in self._dependent)

    def _cumulative_params(self) -> list[int]:
        """Number of distinct parameter elements used by the head of every position."""
        seen: dict[int, int] = {}
        total = 0
        out = []
        for n in self._positions:
            fresh: dict[int, int] = {}
            self._constant_params(n, fresh)
            for key, size in fresh.items():
                if key not in seen:
                    seen[key] = size
                    total += size
            out.append(total)
        return out

    # -- public API -------------------------------------------------------------------------

    @property
    def cuts(self) -> tuple[Cut, ...]:
        return self._cuts

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._input_specs

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self._inputs

    @property
    def model(self) -> nn.Module:
        return self._model

    @functools.cached_property
    def model_id(self) -> str:
        """Hex SHA-256 of the canonical graph description and the weights."""
        return model_id(self._gm)

    def cut(self, cut: Cut | int) -> Cut:
        """Resolve a cut or an index to one of this model's cuts."""
        if isinstance(cut, Cut):
            if not 0 <= cut.index < len(self._cuts) or self._cuts[cut.index] != cut:
                raise PartitionError(f"cut {cut.name!r} does not belong to this model")
            return cut
        if isinstance(cut, bool) or not isinstance(cut, int):
            raise PartitionError(f"cut must be a Cut or an int, got {type(cut).__name__}")
        if not 0 <= cut < len(self._cuts):
            raise PartitionError(f"cut index {cut} out of range: the model has {len(self._cuts)}")
        return self._cuts[cut]

    def split(self, cut: Cut | int) -> tuple[Stage, Stage]:
        """Head and tail modules for ``cut``, verified on the example inputs.

        ``head(*inputs)`` returns the tuple of boundary tensors, ``tail(*boundary)`` the
        model output.
        """
        resolved = self.cut(cut)
        i, boundary = self._cut_nodes[resolved.index]
        head_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for p in self._placeholders:
            env[p] = head_graph.node_copy(p)
        for n in self._positions[: i + 1]:
            self._copy(head_graph, n, env)
        head_graph.output(tuple(env[b] for b in boundary))
        tail_graph = fx.Graph()
        env = {b: tail_graph.placeholder(b.name) for b in boundary}
        for n in self._positions[i + 1 :]:
            self._copy(tail_graph, n, env)
        output = next(n for n in reversed(self._gm.graph.nodes) if n.op == "output")
        result = fx.map_arg(output.args[0], self._lookup(tail_graph, env))
        if self._out_spec is not None:  # exported graphs return flat outputs
            result = pytree.tree_unflatten(list(result), self._out_spec)
        tail_graph.output(result)
        head = Stage(
            self._module(head_graph, "Head"),
            self._input_specs,
            self._free_dims(self._placeholders),
            "head",
        )
        tail = Stage(
            self._module(tail_graph, "Tail"), resolved.boundary, self._free_dims(boundary), "tail"
        )
        self._verify(resolved, head, tail)
        return head, tail

    # -- split helpers ----------------------------------------------------------------------

    def _lookup(self, graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> Callable[[fx.Node], fx.Node]:
        def lookup(node: fx.Node) -> fx.Node:
            if node not in env:
                if node in self._dependent:
                    raise PartitionError(f"internal: {node.name} missing on one side of a cut")
                self._copy(graph, node, env)  # constants are recomputed on each side
            return env[node]

        return lookup

    def _copy(self, graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> None:
        lookup = self._lookup(graph, env)
        args, kwargs = fx.map_arg(node.args, lookup), fx.map_arg(node.kwargs, lookup)
        target = node.target
        if node.op in ("call_module", "get_attr"):
            target = self._flat[str(target)]
        env[node] = graph.create_node(node.op, target, args, kwargs, node.name, node.type)

    @functools.cached_property
    def _flat(self) -> dict[str, str]:
        """Flat attribute names for submodules and tensors, so stages build quickly.

        A GraphModule recreates the dotted hierarchy of every target it references (one
        module per path component); flat names cost a single attribute each.
        """
        flat: dict[str, str] = {}
        taken: set[str] = set()
        for n in self._gm.graph.nodes:
            if n.op in ("call_module", "get_attr") and n.target not in flat:
                name = str(n.target).replace(".", "_")
                while name in taken:
                    name += "_"
                taken.add(name)
                flat[str(n.target)] = name
        return flat

    @functools.cached_property
    def _attributes(self) -> dict[str, Any]:
        return {name: fetch(self._gm, target) for target, name in self._flat.items()}

    def _module(self, graph: fx.Graph, name: str) -> fx.GraphModule:
        graph.lint()
        root = {
            str(n.target): self._attributes[str(n.target)]
            for n in graph.nodes
            if n.op in ("call_module", "get_attr")
        }
        module = fx.GraphModule(root, graph, class_name=name)
        module.eval()
        return module

    def _clone_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in self._inputs)

    def _verify(self, cut: Cut, head: Stage, tail: Stage) -> None:
        try:
            with running(), torch.no_grad():
                out = tail(*head(*self._clone_inputs()))
        except Exception as exc:
            raise PartitionError(f"split at cut {cut.name!r} fails to run: {brief(exc)}") from exc
        if not outputs_match(self._reference, out):
            raise PartitionError(f"split at cut {cut.name!r} does not reproduce the model output")


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _share(part: int, total: int) -> float:
    return min(1.0, part / total) if total > 0 else 0.0


def _bottlenecks(sizes: list[int], input_bytes: int) -> list[bool]:
    """Mark cuts smaller than the input and local minima of the boundary size.

    Runs of equal size (conv -> bn -> relu) count as one: a run is a minimum when the
    nearest different size on each side (where there is one) is larger.
    """
    marks = [False] * len(sizes)
    start = 0
    while start < len(sizes):
        stop = start
        while stop + 1 < len(sizes) and sizes[stop + 1] == sizes[start]:
            stop += 1
        left = sizes[start - 1] if start > 0 else math.inf
        right = sizes[stop + 1] if stop + 1 < len(sizes) else math.inf
        if sizes[start] < input_bytes and sizes[start] < left and sizes[start] < right:
            for k in range(start, stop + 1):
                marks[k] = True
        start = stop + 1
    return marks
