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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from secure_ci.exceptions import ConfigError
from secure_ci.ledger._deployment import Deployment, check_rpc_url
from secure_ci.ledger._records import keccak256
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
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def format_address(raw: bytes) -> str:
    """EIP-55 checksummed ``0x`` text of a 20-byte address."""
    body = raw.hex()
    hashed = keccak256(body.encode()).hex()
    return "0x" + "".join(
        c.upper() if c.isalpha() and int(h, 16) >= 8 else c
        for c, h in zip(body, hashed, strict=False)
    )


def parse_address(text: object) -> bytes:
    """A 20-byte address from ``0x`` hex; mixed case must be a valid EIP-55 checksum."""
    if not isinstance(text, str) or not _ADDRESS.fullmatch(text):
        raise ConfigError(f"not an address: {text!r}")
    body = text[2:]
    raw = bytes.fromhex(body)
    if body != body.lower() and body != body.upper() and format_address(raw) != text:
        raise ConfigError(f"address {text} has a bad EIP-55 checksum")
    return raw


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
        _bounded("max_frame_bytes", self.max_frame_bytes, 1024, 256 << 20)
        _bounded("max_sessions", self.max_sessions, 1, 100_000)
        _bounded("max_inflight_per_device", self.max_inflight_per_device, 1, 10_000)
        _bounded("max_batch", self.max_batch, 1, 4096)
        _bounded("max_queue", self.max_queue, self.max_batch, 1 << 20)
        for name in (
            "handshake_timeout",
            "idle_timeout",
            "request_timeout",
            "drain_timeout",
            "max_deadline_seconds",
        ):
            _bounded(name, getattr(self, name), 0.001, 86_400.0)
        _bounded("max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)
        _bounded("signing_workers", self.signing_workers, 0, MAX_WORKERS)
        if not isinstance(self.signing_workers, int):
            raise ConfigError("signing_workers must be a whole number")


def _bounded(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in {low}..{high}, not {value!r}")


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
        _bounded("seed", self.seed, 0, 2**63)
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
class LedgerSettings:
    """The ``[ledger]`` table: where the edge registers itself and anchors its journal.

    Either ``deployment`` (the deployment file, read by the CLI, which fills ``rpc``,
    ``contract``, ``chain_id`` and ``deployment_block`` through :meth:`with_deployment`) or
    ``rpc`` and ``contract``. Without a chain id the edge learns it from the chain at start.
    """

    rpc: str | None
    contract: bytes | None
    party_id: int
    operator_key_file: Path | None = None
    endpoint: str | None = None
    batch_records: int = 256
    batch_seconds: float = 2.0
    refresh_seconds: float = 1.0
    fund_wei: int = 10**17
    chain_id: int | None = None
    deployment_block: int = 0
    deployment: Path | None = None

    def __post_init__(self) -> None:
        if self.deployment is None and (self.rpc is None or self.contract is None):
            raise ConfigError("[ledger] needs deployment, or rpc and contract")
        if self.rpc is not None:
            check_rpc_url(self.rpc, "ledger.rpc")
        if self.contract is not None:
            if not isinstance(self.contract, bytes) or len(self.contract) != 20:
                raise ConfigError("ledger.contract must be a 20-byte address")
            if self.contract == bytes(20):
                raise ConfigError("ledger.contract must not be the zero address")
        _bounded("ledger.party_id", self.party_id, 1, 2**64 - 1)
        if self.endpoint is not None and (
            not isinstance(self.endpoint, str) or not 0 < len(self.endpoint) <= 256
        ):
            raise ConfigError("ledger.endpoint must be a non-empty string of at most 256 chars")
        _bounded("ledger.batch_records", self.batch_records, 1, 1 << 16)
        _bounded("ledger.batch_seconds", self.batch_seconds, 0.001, 86_400.0)
        _bounded("ledger.refresh_seconds", self.refresh_seconds, 0.001, 86_400.0)
        _bounded("ledger.fund_wei", self.fund_wei, 0, 2**128)
        _bounded("ledger.deployment_block", self.deployment_block, 0, 2**63)
        if self.chain_id is not None:
            _bounded("ledger.chain_id", self.chain_id, 1, 2**63)
        if not all(isinstance(v, int) for v in (self.party_id, self.batch_records, self.fund_wei)):
            raise ConfigError("ledger.party_id, batch_records and fund_wei must be integers")

    def with_deployment(self, deployment: Deployment) -> LedgerSettings:
        """These settings on ``deployment``'s chain (an ``rpc`` given here is kept)."""
        if self.contract not in (None, deployment.contract):
            raise ConfigError("ledger.contract differs from the deployment's contract")
        if self.chain_id not in (None, deployment.chain_id):
            raise ConfigError("ledger.chain_id differs from the deployment's chain id")
        return replace(
            self,
            rpc=self.rpc or deployment.rpc,
            contract=deployment.contract,
            chain_id=deployment.chain_id,
            deployment_block=deployment.deployment_block,
            deployment=None,
        )


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
        _bounded("port", self.port, 0, 65535)
        if not self.host or len(self.host) > 253:
            raise ConfigError("listen host must be a non-empty name or address")
        if any(len(a) != 20 for a in self.allowed_devices):
            raise ConfigError("allowed devices must be 20-byte addresses")
        if len(self.mrenclave) != 32 or len(self.mrsigner) != 32 or len(self.contract) != 20:
            raise ConfigError("mrenclave/mrsigner must be 32 bytes, contract 20 bytes")
        _bounded("chain_id", self.chain_id, 0, 2**63)
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


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _hex32(value: object, name: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ConfigError(f"{name} must be 64 hex digits")
    return bytes.fromhex(value)


def _ints(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{name} must be a list of integers")
    return tuple(value)


def _strs(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings")
    return tuple(value)


def _path(value: object, base_dir: Path, name: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a path string")
    return (base_dir / value).resolve()


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
_LEDGER = {
    "deployment",
    "chain_id",
    "rpc",
    "contract",
    "operator_key_file",
    "party_id",
    "endpoint",
    "batch_records",
    "batch_seconds",
    "refresh_seconds",
    "fund_wei",
}


def _ledger(doc: Mapping[str, Any], base_dir: Path) -> LedgerSettings | None:
    """The optional ``[ledger]`` table (the domain then comes from the chain, not the file)."""
    if "ledger" not in doc:
        return None
    table = _table(doc, "ledger")
    unknown = set(table) - _LEDGER
    if unknown:
        raise ConfigError(f"unknown ledger keys: {', '.join(sorted(unknown))}")
    missing = {"operator_key_file", "party_id"} - set(table)
    if "deployment" not in table:
        missing |= {"rpc", "contract"} - set(table)
    if missing:
        raise ConfigError(f"[ledger] needs {', '.join(sorted(missing))} (or a deployment file)")
    if "chain_id" in doc or "contract" in doc:
        raise ConfigError("with [ledger], chain_id and contract come from the chain: remove them")
    contract = table.get("contract")
    return LedgerSettings(
        rpc=table.get("rpc"),
        contract=None if contract is None else parse_address(contract),
        party_id=table["party_id"],
        operator_key_file=_path(table["operator_key_file"], base_dir, "ledger.operator_key_file"),
        endpoint=table.get("endpoint"),
        batch_records=table.get("batch_records", 256),
        batch_seconds=table.get("batch_seconds", 2.0),
        refresh_seconds=table.get("refresh_seconds", 1.0),
        fund_wei=table.get("fund_wei", 10**17),
        chain_id=table.get("chain_id"),
        deployment=_path(table.get("deployment"), base_dir, "ledger.deployment"),
    )


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
    cuts = _ints(entry["cuts"], "cuts") if "cuts" in entry else ()
    codecs = _strs(entry.get("codecs", ["float32", "float16", "int8"]), "codecs")
    return ModelSpec(
        zoo=zoo,
        cuts=cuts,
        codecs=codecs,
        seed=entry.get("seed", 0),
        package=_path(package, base_dir, "[[models]] package"),
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
    listen = _table(doc, "listen")
    limits_doc = dict(_table(doc, "limits"))
    known_limits = {f.name for f in fields(EdgeLimits)}
    if set(limits_doc) - known_limits:
        raise ConfigError(f"unknown limits: {', '.join(sorted(set(limits_doc) - known_limits))}")
    raw_models = doc.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError("at least one [[models]] entry is required")
    models = [_model(entry, base_dir) for entry in raw_models]
    simulated = _table(doc, "simulated")
    state = _path(doc.get("state_dir"), base_dir, "state_dir")
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
            journal_dir=_path(doc.get("journal_dir"), base_dir, "journal_dir")
            or (state / "journal" if state is not None else None),
            state_dir=state,
            sealed_dir=_path(doc.get("sealed_dir"), base_dir, "sealed_dir")
            or (state / "sealed" if state is not None else None),
            chain_id=doc.get("chain_id", 0),
            contract=parse_address(doc.get("contract", "0x" + "00" * 20)),
            mrenclave=_hex32(simulated.get("mrenclave", "00" * 32), "simulated.mrenclave"),
            mrsigner=_hex32(simulated.get("mrsigner", "00" * 32), "simulated.mrsigner"),
            export_dir=_path(simulated.get("export_dir"), base_dir, "simulated.export_dir"),
            ledger=_ledger(doc, base_dir),
        )
    except TypeError as exc:
        raise ConfigError(f"edge config has a value of the wrong type: {exc}") from exc
