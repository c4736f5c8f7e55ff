"""A loaded model package, and loading one: every check runs before the package is returned.

Loading verifies, in order: the container (bounds, exact length, digest), the manifest
(canonical JSON, every field), the weights' SHA-256 against the manifest, the safetensors
bounds, the architecture (a zoo name) and that the weights fit it exactly (names, shapes,
dtypes); then it rebuilds the model, recomputes ``model_id`` and the cut analysis, and
refuses the package unless both equal what the manifest says. Exit heads (format version 2)
are checked against the manifest's exits table: digest, exact tensor names, float32 shapes
derived from their cuts' boundaries, finite values, and the model's number of classes.
Profiles, codec tables and exit calibrations are measurements: only the digest protects them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secure_ci.exceptions import ConfigError, PackageError, PartitionError
from secure_ci.package._exit_heads import build_exit_head, model_classes, verify_exit_heads
from secure_ci.package._format import MAX_PACKAGE_BYTES, decode_container
from secure_ci.package._manifest import Calibration, CodecRow, PackageManifest
from secure_ci.package._weights import decode_weights
from secure_ci.partition._canonical import CanonicalRule
from secure_ci.partition._exits import ExitHead
from secure_ci.partition._partitioner import Partitioner
from secure_ci.partition._plan import Cut
from secure_ci.partition._profiles import Profile
from secure_ci.plan._cost import ExitCalibration

__all__ = ["ModelPackage", "build_zoo_model", "load_package", "read_package"]


def build_zoo_model(
    architecture: str,
    weights: Mapping[str, torch.Tensor],
    error: type[ConfigError] | type[PackageError] = PackageError,
) -> nn.Module:
    """Zoo model ``architecture`` holding exactly ``weights`` (names, shapes, dtypes), in eval
    mode; the global RNG is left untouched. Mismatches raise ``error``."""
    from secure_ci import zoo

    try:
        entry = zoo.get(architecture)
    except ConfigError as exc:
        raise error(str(exc)) from None
    with torch.random.fork_rng(devices=[]):
        module = entry.build()
    expected = module.state_dict()
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        raise error(
            f"weights do not fit {architecture}: "
            f"missing {_names(missing) or 'none'}; unexpected {_names(extra) or 'none'}"
        )
    for name, tensor in expected.items():
        given = weights[name]
        if given.shape != tensor.shape or given.dtype != tensor.dtype:
            raise error(
                f"weight {name} of {architecture} must be {tensor.dtype} {tuple(tensor.shape)}, "
                f"got {given.dtype} {tuple(given.shape)}"
            )
    module.load_state_dict(dict(weights), strict=True)
    return module.eval()


def _names(names: set[str]) -> str:
    shown = ", ".join(name[:64] for name in sorted(names)[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class ModelPackage:
    """A verified model package: manifest values, the weights, and the model's partitioner."""

    def __init__(
        self,
        manifest: PackageManifest,
        weights: Mapping[str, torch.Tensor],
        partitioner: Partitioner,
        digest: bytes,
        size: int,
        exit_heads: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        self._manifest = manifest
        self._weights = dict(weights)
        self._partitioner = partitioner
        self._digest = digest
        self._size = size
        self._exit_heads = {cut: dict(state) for cut, state in (exit_heads or {}).items()}

    def __repr__(self) -> str:
        return f"<ModelPackage {self.architecture} model_id {self.model_id_hex[:16]}..>"

    @property
    def manifest(self) -> PackageManifest:
        return self._manifest

    @property
    def model_id(self) -> bytes:
        """The 32-byte model id (digest of architecture and weights), as registered on chain."""
        return bytes.fromhex(self._manifest.model_id)

    @property
    def model_id_hex(self) -> str:
        return self._manifest.model_id

    @property
    def digest(self) -> bytes:
        """SHA-256 over the whole package file (see :mod:`secure_ci.package._format`)."""
        return self._digest

    @property
    def size(self) -> int:
        return self._size

    @property
    def architecture(self) -> str:
        return self._manifest.architecture

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._manifest.input_shape

    @property
    def cuts(self) -> tuple[Cut, ...]:
        return self._manifest.cuts

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return self._manifest.profiles

    @property
    def codecs(self) -> tuple[CodecRow, ...]:
        return self._manifest.codecs

    @property
    def calibration(self) -> Calibration | None:
        return self._manifest.calibration

    @property
    def exit_cuts(self) -> tuple[int, ...]:
        """The cuts that carry an exit head (ascending; empty without exit heads)."""
        table = self._manifest.exits
        return () if table is None else tuple(head.cut for head in table.heads)

    @property
    def exits(self) -> tuple[ExitCalibration, ...]:
        """Every calibrated exit policy, ready for the planner (``ModelCosts(exits=...)``):
        one per exit cut and threshold, with its exit rate, accuracy drop (points, floored at
        0: an exit that helped on the calibration set is not counted as a gain) and the exit
        head's measured milliseconds. Raw values: ``manifest.exits``."""
        table = self._manifest.exits
        if table is None:
            return ()
        return tuple(
            ExitCalibration(
                policy=head.policy(row),
                p_exit=row.p_exit,
                accuracy_drop=max(0.0, row.accuracy_drop_pt),
                head_ms=head.head_ms,
            )
            for head in table.heads
            for row in head.rows
        )

    def exit_head(self, cut: int) -> ExitHead:
        """A fresh exit head for ``cut`` holding the package's trained weights, in eval mode
        (attach it with :func:`~secure_ci.partition.attach_exit`)."""
        table = self._manifest.exits
        info = next((h for h in table.heads if h.cut == cut), None) if table else None
        if info is None:
            raise ConfigError(f"the package has no exit head at cut {cut!r:.20}")
        return build_exit_head(self.cuts[cut], info, self._exit_heads[cut])

    @property
    def canonical(self) -> CanonicalRule:
        """The model's canonical output rule (the manifest's, else the default): what
        edges' results must agree on for a dispute (see :mod:`secure_ci.partition._canonical`)."""
        return self._manifest.canonical_rule

    @property
    def batchable_cuts(self) -> tuple[int, ...]:
        """Cuts whose every boundary tensor has a batch dimension: an edge batches requests
        for these across devices (other cuts are served one request per call)."""
        return tuple(
            cut.index
            for cut in self.cuts
            if all(spec.batch_dim is not None for spec in cut.boundary)
        )

    def build(self) -> nn.Module:
        """A fresh module of the architecture holding the package's weights, in eval mode."""
        return build_zoo_model(self.architecture, self._weights)

    def partitioner(self) -> Partitioner:
        """The partitioner the package was verified with (its model is in eval mode)."""
        return self._partitioner

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary of everything the package holds (for ``model inspect``)."""
        m = self._manifest
        timings = {c.index: c for c in m.profiles[0].cuts} if m.profiles else {}
        cuts = []
        batchable = set(self.batchable_cuts)
        for cut in m.cuts:
            timing = timings.get(cut.index)
            cuts.append(
                {
                    **cut.to_json(),
                    "head_ms": timing.head_ms if timing else None,
                    "tail_ms": timing.tail_ms if timing else None,
                    "batchable": cut.index in batchable,
                }
            )
        return {
            "package_digest": self._digest.hex(),
            "package_bytes": self._size,
            "architecture": m.architecture,
            "input_shape": list(m.input_shape),
            "model_id": m.model_id,
            "weights": {
                "sha256": m.weights_sha256,
                "bytes": m.weights_bytes,
                "tensors": m.weights_tensors,
                "parameters": m.weights_parameters,
            },
            "total_flops": m.total_flops,
            "total_params": m.total_params,
            "cuts": cuts,
            "batchable_cuts": list(self.batchable_cuts),
            "profiles": [p.to_json() for p in m.profiles],
            "codecs": {
                "measured_on": m.codec_inputs,
                "calibration": None if m.calibration is None else m.calibration.to_json(),
                "rows": [row.to_json() for row in m.codecs],
            },
            "exits": None if m.exits is None else m.exits.to_json(),
            "canonical": self.canonical.to_json(),
            "created_with": dict(m.created_with),
        }


def read_package(data: bytes) -> ModelPackage:
    """Verify package bytes and rebuild the model (see the module docstring)."""
    container = decode_container(data)
    manifest = PackageManifest.from_json(container.manifest, exits_key=container.version >= 2)
    weights_bytes = container.weights
    if (
        hashlib.sha256(weights_bytes).hexdigest() != manifest.weights_sha256
        or len(weights_bytes) != manifest.weights_bytes
    ):
        raise PackageError("the weights do not match the digest in the manifest")
    weights = decode_weights(weights_bytes)
    module = build_zoo_model(manifest.architecture, weights)
    if len(weights) != manifest.weights_tensors or manifest.weights_parameters != sum(
        p.numel() for p in module.parameters()
    ):
        raise PackageError("the weight counts in the manifest differ from the weights")
    try:
        partitioner = Partitioner(module, (torch.zeros(manifest.input_shape),))
    except PartitionError as exc:
        raise PackageError(f"the packaged model cannot be analysed: {exc}") from None
    if partitioner.model_id != manifest.model_id:
        raise PackageError(
            f"model_id mismatch: the manifest says {manifest.model_id[:16]}.., the weights and "
            f"architecture give {partitioner.model_id[:16]}.."
        )
    if partitioner.cuts != manifest.cuts or (
        partitioner.total_flops,
        partitioner.total_params,
    ) != (manifest.total_flops, manifest.total_params):
        raise PackageError("the package's partition analysis does not match its model")
    exit_heads = {}
    if manifest.exits is not None or container.exits:
        try:
            classes = model_classes(module, manifest.input_shape)
        except Exception as exc:  # the model's own forward: translate anything
            raise PackageError(f"the packaged model fails on a zero input: {exc}") from None
        exit_heads = verify_exit_heads(manifest.exits, container.exits, manifest.cuts, classes)
    return ModelPackage(
        manifest, weights, partitioner, container.digest, len(data), exit_heads=exit_heads
    )


def load_package(path: Path) -> ModelPackage:
    """Read and verify the package file at ``path``.

    A missing or unreadable file is a :class:`ConfigError`; a file that is not a valid,
    untampered package is a :class:`PackageError`.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PACKAGE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read model package {path}: {exc.strerror or exc}") from None
    return read_package(data)
