"""Render enclave/secure-ci-edge.manifest.template for this machine.

Usage: python enclave/render.py --app-dir DIR --data-dir DIR --sealed-dir DIR
    [--out secure-ci-edge.manifest]
Then sign it with gramine-sgx-sign (see enclave/README.md).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from secure_ci.edge import render_manifest

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--app-dir", required=True, help="directory with edge.toml")
    parser.add_argument("--data-dir", required=True, help="writable journal directory")
    parser.add_argument(
        "--sealed-dir", required=True, help="host directory of the encrypted (sealed) keys"
    )
    parser.add_argument("--out", default="secure-ci-edge.manifest")
    parser.add_argument("--enclave-size", default="8G")
    parser.add_argument("--max-threads", type=int, default=64)
    parser.add_argument("--gramine-prefix", default="/usr/lib/x86_64-linux-gnu/gramine")
    parser.add_argument("--log-level", default="error")
    args = parser.parse_args()
    prefix = args.gramine_prefix
    values = {
        "python": sys.executable,
        "python_prefix": sys.base_prefix,
        "venv_site": sysconfig.get_paths()["purelib"],
        "gramine_libos": f"{prefix}/libsysdb.so",
        "gramine_runtimedir": f"{prefix}/runtime/glibc",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "app_dir": str(Path(args.app_dir).resolve()),
        "data_dir": str(Path(args.data_dir).resolve()),
        "sealed_dir": str(Path(args.sealed_dir).resolve()),
        "log_level": args.log_level,
        "enclave_size": args.enclave_size,
        "max_threads": args.max_threads,
        "max_threads_torch": max(1, args.max_threads // 8),
        "edmm_enable": False,
        "isvprodid": 1,
        "isvsvn": 1,
    }
    template = (HERE / "secure-ci-edge.manifest.template").read_text()
    Path(args.out).write_text(render_manifest(template, values))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
