"""Tracing a model into a torch.fx graph and recording what each node does on example inputs.

Tracing errors (data-dependent control flow, unsupported Python on tensors) are translated
into :class:`PartitionError` naming the offending source line. The traced graph is then run
once on the example inputs to record, per node, its output shapes, an estimate of its FLOPs
and the parameters it touches, and to check that the trace reproduces the model.
"""

from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from secure_ci._encoding import digest
from secure_ci.exceptions import PartitionError
from secure_ci.partition._flops import node_flops
from secure_ci.partition._guard import running, tracing
from secure_ci.partition._plan import TensorSpec

__all__ = [
    "NodeRecord",
    "Traced",
    "analyse",
    "brief",
    "fetch",
    "flatten",
    "model_id",
    "outputs_match",
    "spec_of",
    "trace",
]

ATOL = 1e-5
RTOL = 1e-5


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    """Shape and dtype of ``tensor``; its batch dimension is unknown here (None)."""
    return TensorSpec(
        shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."), batch_dim=None
    )


def _where(exc: BaseException) -> str:
    """The innermost frame of the failing call outside torch: the op that cannot be traced."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "secure_ci/partition" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}(): `{(f.line or '').strip()}`"


def brief(exc: BaseException) -> str:
    """A foreign exception in one short line (torch appends pages of debugging hints)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


@dataclass(frozen=True)
class Traced:
    """A traced graph and how it was obtained.

    ``exported`` graphs (torch.export) are specialised to the example shapes; their
    ``out_spec`` rebuilds the model's output structure from the flat graph outputs.
    """

    gm: fx.GraphModule
    exported: bool
    out_spec: Any = None


def trace(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Traced:
    """Trace with torch.fx, falling back to torch.export; failure is a PartitionError.

    torch.export handles Python that depends on shapes (``len(x)``, ``if x.shape[0]``) by
    specialising to the example; data-dependent control flow defeats both.
    """
    with tracing():
        try:
            return Traced(fx.symbolic_trace(model), exported=False)
        except Exception as exc:  # tracing runs arbitrary user code: translate everything
            reason = f"cannot trace {type(model).__name__}{_where(exc)}: {brief(exc)}"
            try:
                return _export(model, inputs)
            except Exception as export_exc:
                raise PartitionError(f"{reason} (torch.export: {brief(export_exc)})") from exc


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Traced:
    program = torch.export.export(model, inputs)
    gm = program.module()
    if not isinstance(gm, fx.GraphModule):
        raise TypeError("torch.export did not produce a GraphModule")
    for n in list(gm.graph.nodes):  # runtime shape guards: our stages check shapes instead
        if n.op == "call_module" and str(n.target).startswith("_guards") and not n.users:
            gm.graph.erase_node(n)
    gm.recompile()
    return Traced(gm, exported=True, out_spec=program.call_spec.out_spec)


@dataclass(frozen=True)
class NodeRecord:
    """What one node produced on the example inputs."""

    is_tensor: bool
    spec: TensorSpec | None
    flops: int
    params: tuple[tuple[int, int], ...]  # (id, numel) of the parameters the node touches


class _Recorder(fx.Interpreter):
    """Runs the graph once, recording a NodeRecord per node and translating op failures."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.records: dict[fx.Node, NodeRecord] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None  # type: ignore[arg-type]
        try:
            out = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as exc:
            raise PartitionError(
                f"op {n.name} ({n.op} {_target_name(n.target)}) fails on the example inputs "
                f"(wrong input shape or dtype?): {brief(exc)}"
            ) from exc
        params: tuple[tuple[int, int], ...] = ()
        if isinstance(module, nn.Module):
            params = tuple((id(p), p.numel()) for p in module.parameters())
        elif n.op == "get_attr" and isinstance(out, torch.Tensor):
            params = ((id(out), out.numel()),)
        is_tensor = isinstance(out, torch.Tensor)
        self.records[n] = NodeRecord(
            is_tensor=is_tensor,
            spec=spec_of(out) if is_tensor else None,
            flops=node_flops(n.op, n.target, tuple(args), out, module),
            params=params,
        )
        return out


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return str(getattr(target, "__qualname__", None) or getattr(target, "__name__", target))


def analyse(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> tuple[dict[fx.Node, NodeRecord], Any]:
    """Run ``gm`` on ``inputs`` once; return per-node records and the output."""
    recorder = _Recorder(gm)
    with running(), torch.no_grad():
        out = recorder.run(*inputs)
    return recorder.records, out


def flatten(value: Any) -> list[Any]:
    """Leaves of nested tuples/lists/dicts, in a deterministic order."""
    if isinstance(value, tuple | list):
        return [leaf for item in value for leaf in flatten(item)]
    if isinstance(value, dict):
        return [leaf for key in sorted(value, key=repr) for leaf in flatten(value[key])]
    return [value]


def outputs_match(expected: Any, actual: Any) -> bool:
    """Same structure and values (float tensors within atol/rtol 1e-5)."""
    left, right = flatten(expected), flatten(actual)
    if len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            if not torch.allclose(a, b, atol=ATOL, rtol=RTOL, equal_nan=True):
                return False
        elif type(a) is not type(b) or a != b:
            return False
    return True


def _describe(value: Any) -> Any:
    """A canonical-CBOR-ready description of a node argument."""
    if isinstance(value, fx.Node):
        return ["node", value.name]
    if isinstance(value, tuple | list):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return [["kw", str(k), _describe(v)] for k, v in sorted(value.items())]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return repr(value)
    return repr(value) if not callable(value) else _target_name(value)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def model_id(gm: fx.GraphModule) -> str:
    """Hex digest of the canonical graph description and every weight's bytes."""
    nodes = []
    for n in gm.graph.nodes:
        module_desc = None
        if n.op == "call_module":
            sub = gm.get_submodule(n.target)
            module_desc = [f"{type(sub).__module__}.{type(sub).__qualname__}", sub.extra_repr()]
        args = _describe(n.args)
        nodes.append([n.op, n.name, _target_name(n.target), args, _describe(n.kwargs), module_desc])
    weights = hashlib.sha256()
    tensors = dict(gm.state_dict(keep_vars=True))
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in tensors:
            value = fetch(gm, n.target)
            if isinstance(value, torch.Tensor):
                tensors[n.target] = value
    for name in sorted(tensors):
        tensor = tensors[name]
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode()
        weights.update(len(header).to_bytes(4, "big") + header)
        weights.update(_tensor_bytes(tensor))
    return digest("partition/model", {"graph": nodes, "weights": weights.digest()}).hex()


def fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
