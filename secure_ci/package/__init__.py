"""Model packages: one file that carries a model to devices and edges, verified on load.

A package holds the architecture (a zoo name), the weights (safetensors, never a pickle),
the input shape, the partition analysis (every cut with its boundary tensor specs, their
batch dimensions and bytes), a measured latency profile, the codec table (bytes on the wire
and accuracy drop per cut and codec) and the ``model_id`` (digest of architecture and
weights), sealed by a digest of the whole file. The byte layout is documented in
:mod:`secure_ci.package._format`.

``pack_model(model, architecture=..., input_shape=..., out=path)`` writes one;
``load_package(path)`` verifies one (digest, bounds, weights digest, recomputed
``model_id`` and cut analysis, exit heads) and returns a :class:`ModelPackage`, whose
``build()`` gives a fresh module and ``partitioner()`` the verified partitioner.

A package packed with a calibration set also carries exit heads at a few early cuts, trained
and calibrated on disjoint samples: ``package.exits`` gives the calibrated exit policies
(``secure_ci.plan.ExitCalibration``: p_exit, accuracy drop and exit head ms per cut and
threshold) and ``package.exit_head(cut)`` a fresh :class:`~secure_ci.partition.ExitHead`.

User models exported with ``torch.export`` are not accepted: loading an exported program
can unpickle (``torch.export.load`` unpickles weights its archive flags as pickled).
"""

from __future__ import annotations

from secure_ci.package._calibrate import DEFAULT_CODECS, Progress
from secure_ci.package._exit_heads import DEFAULT_EXIT_THRESHOLDS, default_exit_cuts
from secure_ci.package._exit_manifest import ExitHeadInfo, ExitRow, ExitTable, ExitTraining
from secure_ci.package._format import MAX_PACKAGE_BYTES
from secure_ci.package._manifest import Calibration, CodecRow, PackageManifest
from secure_ci.package._pack import pack_bytes, pack_model
from secure_ci.package._package import ModelPackage, build_zoo_model, load_package, read_package
from secure_ci.package._weights import decode_weights, encode_weights, read_torch_state_dict

__all__ = [
    "DEFAULT_CODECS",
    "DEFAULT_EXIT_THRESHOLDS",
    "MAX_PACKAGE_BYTES",
    "Calibration",
    "CodecRow",
    "ExitHeadInfo",
    "ExitRow",
    "ExitTable",
    "ExitTraining",
    "ModelPackage",
    "PackageManifest",
    "Progress",
    "build_zoo_model",
    "decode_weights",
    "default_exit_cuts",
    "encode_weights",
    "load_package",
    "pack_bytes",
    "pack_model",
    "read_package",
    "read_torch_state_dict",
]
