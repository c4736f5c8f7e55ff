"""Shared helpers for edge tests: a digits model split at cut 2, served in-process."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from secure_ci.edge import EdgeConfig, EdgeLimits, ModelRegistry, open_edge
from secure_ci.edge._identity import MemoryJournal
from secure_ci.edge._models import tails_from_partitioner
from secure_ci.edge._service import EdgeService
from secure_ci.ledger._records import address_of
from secure_ci.partition import Partitioner
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave, new_device_key
from secure_ci.zoo import get

CUT = 2
CODECS = ("float32", "float16", "int8")


@dataclass
class Served:
    edge: EdgeService
    enclave: DevEnclave
    key: bytes
    journal: MemoryJournal
    head: torch.nn.Module
    model: torch.nn.Module
    model_id: bytes


@functools.cache
def build_partitioner() -> Partitioner:
    entry = get("digits_cnn")
    torch.manual_seed(0)
    return Partitioner(entry.build(), (torch.zeros(entry.input_shape),))


def registry() -> ModelRegistry:
    models = ModelRegistry()
    for tail in tails_from_partitioner(build_partitioner(), [CUT], CODECS):
        models.add(tail)
    return models


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    limits = getattr(request, "param", EdgeLimits(max_wait_ms=1.0))
    enclave = dev_enclave(DEV_NOW)
    key = new_device_key()
    journal = MemoryJournal()
    config = EdgeConfig(limits=limits, allowed_devices=frozenset({address_of(key)}))
    partitioner = build_partitioner()
    head, _ = partitioner.split(CUT)
    async with open_edge(
        config,
        provider=enclave.provider,
        models=registry(),
        journal=journal,
        clock=lambda: float(DEV_NOW),
    ) as edge:
        yield Served(
            edge,
            enclave,
            key,
            journal,
            head,
            partitioner.model,
            bytes.fromhex(partitioner.model_id),
        )
