"""A device sends int8 features of a split model to an attested edge and checks the answer.

The edge runs in this process on loopback with a simulated SGX enclave (a fresh development
PKI); the device verifies the RA-TLS certificate under a policy that trusts that dev root and
the enclave's MRENCLAVE, authenticates with its key, and gets enclave-signed results.

Run: .venv/bin/python examples/confidential_inference.py
"""

from __future__ import annotations

import asyncio
import time

import torch

from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import EdgeConfig, ModelRegistry, open_edge, tails_from_partitioner
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.testing import dev_enclave
from secure_ci.zoo import get


async def main() -> None:
    entry = get("mobilenet_v2")
    torch.manual_seed(0)
    model = entry.build().eval()
    x = torch.randn(entry.input_shape)
    partitioner = Partitioner(model, (x,))
    cut = next(c for c in partitioner.cuts if c.bottleneck and c.head_flops_share > 0.2)
    models = ModelRegistry()
    for tail in tails_from_partitioner(partitioner, [cut.index], ["int8"]):
        models.add(tail)

    enclave = dev_enclave(int(time.time()))
    device = DeviceIdentity.generate()
    config = EdgeConfig(host="127.0.0.1", provider="simulated")
    plan = PartitionPlan(model_id=partitioner.model_id, cut=cut.index, codec="int8")
    async with (
        open_edge(
            config, provider=enclave.provider, models=models,
            allowed_devices=frozenset({device.address}),
        ) as edge,
        open_session(
            f"127.0.0.1:{edge.port}", policy=enclave.policy, collateral=enclave.collateral,
            identity=device, model=model, plan=plan, example_input=x,
        ) as session,
    ):  # fmt: skip
        outputs = await session.infer_many([torch.randn(entry.input_shape) for _ in range(8)])
        print(
            f"edge enclave {session.enclave.mrenclave.hex()[:16]}.. ({session.enclave.tcb_status})"
        )
        print(f"split at {cut.name} ({cut.nbytes} B float32), {len(outputs)} results")
        last = session.receipts[-1]
        print(f"last receipt: task {last.request.task_id.hex()[:16]}.., seq {last.result.edge_seq}")


if __name__ == "__main__":
    asyncio.run(main())
