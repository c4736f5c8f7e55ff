"""secure-ci: confidential, ledger-backed collaborative inference.

A network is split between a device, which runs the head, and an attested TEE enclave at the
edge, which runs the tail; a shared EVM ledger records every task so that parties who do not
trust each other can cooperate and audit. See ARCHITECTURE.md for the design.
"""

from secure_ci.exceptions import SecureCIError

__all__ = ["SecureCIError", "__version__"]

__version__ = "0.1.0"
