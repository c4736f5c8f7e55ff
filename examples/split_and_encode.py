"""Split a model at every cut and compare feature codecs: the device side of a plan.

Run: .venv/bin/python examples/split_and_encode.py
"""

from __future__ import annotations

import torch

from secure_ci.partition import Partitioner, decode_features, encode_features
from secure_ci.zoo import get


def main() -> None:
    entry = get("resnet18")
    torch.manual_seed(0)
    model = entry.build().eval()
    x = torch.randn(entry.input_shape)
    partitioner = Partitioner(model, (x,))
    with torch.inference_mode():
        reference = model(x)
        for cut in partitioner.cuts[::6]:
            head, tail = partitioner.split(cut)
            boundary = head(x)
            sizes = {c: len(encode_features(boundary, c)) for c in ("float32", "int8", "int4")}
            out = tail(*decode_features(encode_features(boundary, "int8")))
            error = float((out - reference).abs().max())
            print(f"cut {cut.index:3d} {cut.name:28s} {sizes}  int8 max error {error:.4f}")
    print(f"model_id {partitioner.model_id[:16]}.. with {len(partitioner.cuts)} cuts")


if __name__ == "__main__":
    main()
