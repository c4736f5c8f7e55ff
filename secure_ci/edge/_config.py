"""Edge configuration: a frozen value parsed from TOML (the CLI reads the file).

Example::

    provider = "simulated"            # "auto" | "simulated" | "gramine"
    allowed_devices = ["0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"]
    state_dir = "state"               # keys (sealed), journal, dev PKI; one edge per directory
    sealed_dir = "state/sealed"       # default state_dir/sealed (Gramine: an encrypted mount)
    journal_dir = "journal"           # default state_dir/journal; relative to the config file
    chain_id = 31337                  # optional EIP-712 domain of the ledger
    contract = "0x0000000000000000000000000000000000000000"

    [listen]
    host = "127.0.0.1"
    port = 7443

    [[models]]
    package = "digits.scipkg"         # a model package (`secure-ci model pack`), relative
    cuts = [2, 4]                     # optional for a package: default every batchable cut
    codecs = ["float16", "int8"]

    [[models]]                        # or a zoo model with weights drawn from a seed (tests)
    zoo = "resnet18"
    cuts = [3]
    seed = 0                          # the device must draw the same weights

    [limits]
    max_frame_bytes = 4194304
    max_sessions = 256

    [simulated]                       # only for provider = "simulated"
    mrenclave = "<64 hex>"
    mrsigner = "<64 hex>"
    export_dir = "dev-pki"            # where the dev root and collateral are written for devices

    [ledger]                          # optional: register, admit registered devices, anchor
    deployment = "deployment.json"    # from `secure-ci ledger deploy`; or rpc + contract:
    rpc = "http://127.0.0.1:8545"     # overrides the deployment's RPC URL when both are given
    contract = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    operator_key_file = "operator.key"  # hex key of the party admin, relative to this file
    party_id = 1
    endpoint = "127.0.0.1:7443"       # optional: announced on chain (default: [listen])
    batch_records = 256               # close a batch after this many records ...
    batch_seconds = 2.0               # ... or after this many seconds
    refresh_seconds = 1.0             # how often the device registry is re-read
    fund_wei = 100000000000000000     # top the enclave key up to this (it pays for anchors)

With ``[ledger]`` the chain is the authority: the EIP-712 domain (chain id, contract) comes
from it (so top-level ``chain_id``/``contract`` must be absent), ``allowed_devices`` must be
empty (the registry is the allow-list) and a journal is required (anchoring needs it).
Without ``state_dir`` the edge makes new keys at every start (tests, throw-away edges).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from secure_ci.edge._config_ledger import LedgerSettings, parse_ledger
from secure_ci.edge._config_values import (
    bounded,
    format_address,
    hex32,
    int_list,
    parse_address,
    path_of,
    str_list,
    table_of,
)
from secure_ci.exceptions import ConfigError
from secure_ci.ledger._signing import MAX_WORKERS

__all__ = [
    "EdgeConfig",
    "EdgeLimits",
    "LedgerSettings",
    "ModelSpec",
    "format_address",
    "load_edge_config",
    "parse_address",
]

PROVIDERS = ("auto", "simulated", "gramine")


@dataclass(frozen=True)
class EdgeLimits:
    """Resource limits: every queue, count and wait of the edge is bounded by one of these."""

    max_frame_bytes: int = 4 << 20
    max_sessions: int = 256
    max_inflight_per_device: int = 64
    handshake_timeout: float = 5.0
    idle_timeout: float = 60.0
    request_timeout: float = 30.0
    drain_timeout: float = 10.0
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_deadline_seconds: float = 3600.0  # a request's deadline must fall within this
    max_queue: int = 1024
    signing_workers: int = 0  # processes that sign results (0: the tail thread; 1 is plenty)

    def __post_init__(self) -> None:
        bounded("max_frame_bytes", self.max_frame_bytes, 1024, 256 << 20)
        bounded("max_sessions", self.max_sessions, 1, 100_000)
        bounded("max_inflight_per_device", self.max_inflight_per_device, 1, 10_000)
        bounded("max_batch", self.max_batch, 1, 4096)
        bounded("max_queue", self.max_queue, self.max_batch, 1 << 20)
        for name in (
            "handshake_timeout",
            "idle_timeout",
            "request_timeout",
            "drain_timeout",
            "max_deadline_seconds",
        ):
            bounded(name, getattr(self, name), 0.001, 86_400.0)
        bounded("max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)
        bounded("signing_workers", self.signing_workers, 0, MAX_WORKERS)
        if not isinstance(self.signing_workers, int):
            raise ConfigError("signing_workers must be a whole number")


@dataclass(frozen=True)
class ModelSpec:
    """A model served with the given cuts and feature codecs.

    Either ``zoo`` (a zoo model, weights drawn from ``seed``: for tests) or ``package`` (a
    model package file), never both. A package with no ``cuts`` serves every cut whose
    boundary tensors all have a batch dimension in its analysis (its batchable cuts).
    """

    zoo: str | None = None
    cuts: tuple[int, ...] = ()
    codecs: tuple[str, ...] = ("float32", "float16", "int8")
    seed: int = 0
    package: Path | None = None

    def __post_init__(self) -> None:
        if (self.zoo is None) == (self.package is None):
            raise ConfigError("a model needs either a zoo name or a package path (not both)")
        if self.package is not None and not isinstance(self.package, Path):
            raise ConfigError("a model's package must be a path")
        bounded("seed", self.seed, 0, 2**63)
        if self.zoo is not None:
            if not isinstance(self.zoo, str) or not re.fullmatch(r"[a-z0-9_]+", self.zoo):
                raise ConfigError(f"bad zoo model name {self.zoo!r}")
            if not self.cuts:
                raise ConfigError(f"model {self.zoo}: cuts must be a non-empty list of uint16")
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 1 << 16
               for c in self.cuts):  # fmt: skip
            raise ConfigError(f"model {self.name}: cuts must be a list of uint16")
        if len(set(self.cuts)) != len(self.cuts):
            raise ConfigError(f"model {self.name}: a cut is listed twice")
        if not self.codecs or not all(isinstance(c, str) and c for c in self.codecs):
            raise ConfigError(f"model {self.name}: codecs must be a non-empty list of names")

    @property
    def name(self) -> str:
        """The zoo name or the package path, for messages."""
        return self.zoo if self.zoo is not None else str(self.package)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything ``secure-ci edge serve`` needs; validated at construction."""

    host: str = "127.0.0.1"
    port: int = 0
    provider: str = "auto"
    models: tuple[ModelSpec, ...] = ()
    allowed_devices: frozenset[bytes] = frozenset()
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    journal_dir: Path | None = None
    state_dir: Path | None = None
    sealed_dir: Path | None = None
    chain_id: int = 0
    contract: bytes = bytes(20)
    mrenclave: bytes = bytes(32)
    mrsigner: bytes = bytes(32)
    export_dir: Path | None = None
    ledger: LedgerSettings | None = None

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"provider must be one of {PROVIDERS}, not {self.provider!r}")
        bounded("port", self.port, 0, 65535)
        if not self.host or len(self.host) > 253:
            raise ConfigError("listen host must be a non-empty name or address")
        if any(len(a) != 20 for a in self.allowed_devices):
            raise ConfigError("allowed devices must be 20-byte addresses")
        if len(self.mrenclave) != 32 or len(self.mrsigner) != 32 or len(self.contract) != 20:
            raise ConfigError("mrenclave/mrsigner must be 32 bytes, contract 20 bytes")
        bounded("chain_id", self.chain_id, 0, 2**63)
        if self.ledger is not None:
            if self.allowed_devices:
                raise ConfigError(
                    "with [ledger] the chain's registry is the allow-list: "
                    "allowed_devices must be empty"
                )
            if self.journal_dir is None:
                raise ConfigError(
                    "with [ledger] a state_dir (or journal_dir) is required: the journal is"
                    " anchored from it"
                )
            if self.ledger.endpoint is None and self.port == 0:
                raise ConfigError("with [ledger] and listen port 0, set ledger.endpoint")
            if self.contract not in (bytes(20), self.ledger.contract):
                raise ConfigError("contract differs from ledger.contract")
        if self.sealed_dir is not None and self.state_dir is None:
            raise ConfigError("sealed_dir needs a state_dir")


_TOP = {
    "provider",
    "state_dir",
    "sealed_dir",
    "allowed_devices",
    "journal_dir",
    "chain_id",
    "contract",
    "listen",
    "models",
    "limits",
    "simulated",
    "ledger",
}
_MODEL = {"zoo", "package", "cuts", "codecs", "seed"}


def _model(entry: object, base_dir: Path) -> ModelSpec:
    """One ``[[models]]`` entry: ``zoo`` (+ ``seed``) or ``package``, with cuts and codecs."""
    if not isinstance(entry, Mapping):
        raise ConfigError("each [[models]] entry must be a table")
    unknown = set(entry) - _MODEL
    if unknown:
        raise ConfigError(f"unknown [[models]] keys: {', '.join(sorted(unknown))}")
    zoo, package = entry.get("zoo"), entry.get("package")
    if (zoo is None) == (package is None):
        raise ConfigError("each [[models]] needs either zoo = NAME or package = PATH, not both")
    if zoo is not None and not isinstance(zoo, str):
        raise ConfigError("[[models]] zoo must be a model name")
    if package is not None and "seed" in entry:
        raise ConfigError("[[models]] seed applies to zoo models only: a package has weights")
    cuts = int_list(entry["cuts"], "cuts") if "cuts" in entry else ()
    codecs = str_list(entry.get("codecs", ["float32", "float16", "int8"]), "codecs")
    return ModelSpec(
        zoo=zoo,
        cuts=cuts,
        codecs=codecs,
        seed=entry.get("seed", 0),
        package=path_of(package, base_dir, "[[models]] package"),
    )


def load_edge_config(toml_text: str, base_dir: Path) -> EdgeConfig:
    """Parse the TOML text of an edge configuration; relative paths resolve against base_dir."""
    try:
        doc = tomllib.loads(toml_text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"edge config is not valid TOML: {exc}") from exc
    unknown = set(doc) - _TOP
    if unknown:
        raise ConfigError(f"unknown edge config keys: {', '.join(sorted(unknown))}")
    listen = table_of(doc, "listen")
    limits_doc = dict(table_of(doc, "limits"))
    known_limits = {f.name for f in fields(EdgeLimits)}
    if set(limits_doc) - known_limits:
        raise ConfigError(f"unknown limits: {', '.join(sorted(set(limits_doc) - known_limits))}")
    raw_models = doc.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError("at least one [[models]] entry is required")
    models = [_model(entry, base_dir) for entry in raw_models]
    simulated = table_of(doc, "simulated")
    state = path_of(doc.get("state_dir"), base_dir, "state_dir")
    devices = doc.get("allowed_devices", [])
    if not isinstance(devices, list):
        raise ConfigError("allowed_devices must be a list of addresses")
    try:
        return EdgeConfig(
            host=listen.get("host", "127.0.0.1"),
            port=listen.get("port", 0),
            provider=doc.get("provider", "auto"),
            models=tuple(models),
            allowed_devices=frozenset(parse_address(a) for a in devices),
            limits=EdgeLimits(**limits_doc),
            journal_dir=path_of(doc.get("journal_dir"), base_dir, "journal_dir")
            or (state / "journal" if state is not None else None),
            state_dir=state,
            sealed_dir=path_of(doc.get("sealed_dir"), base_dir, "sealed_dir")
            or (state / "sealed" if state is not None else None),
            chain_id=doc.get("chain_id", 0),
            contract=parse_address(doc.get("contract", "0x" + "00" * 20)),
            mrenclave=hex32(simulated.get("mrenclave", "00" * 32), "simulated.mrenclave"),
            mrsigner=hex32(simulated.get("mrsigner", "00" * 32), "simulated.mrsigner"),
            export_dir=path_of(simulated.get("export_dir"), base_dir, "simulated.export_dir"),
            ledger=parse_ledger(doc, base_dir),
        )
    except TypeError as exc:
        raise ConfigError(f"edge config has a value of the wrong type: {exc}") from exc
