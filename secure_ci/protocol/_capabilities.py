"""Hello capabilities the protocol understands (unknown ones are ignored, for compatibility).

``model:<model id hex>/<cut>``: the device will send tasks for that (model, cut); an edge
that does not serve it refuses the session at the handshake (``UNKNOWN_MODEL``), before the
device sends a single feature byte.
"""

from __future__ import annotations

from secure_ci.exceptions import RemoteProtocolError
from secure_ci.protocol._codes import ErrorCode

__all__ = ["MODEL_CAPABILITY", "model_capability", "wanted_models"]

MODEL_CAPABILITY = "model:"


def model_capability(model_id: bytes, cut: int) -> str:
    return f"{MODEL_CAPABILITY}{model_id.hex()}/{cut}"


def wanted_models(capabilities: tuple[str, ...]) -> list[tuple[bytes, int]]:
    """The (model id, cut) pairs a Hello announces; MALFORMED for a bad ``model:`` entry."""
    wanted = []
    for text in capabilities:
        if not text.startswith(MODEL_CAPABILITY):
            continue
        model_hex, sep, cut_text = text.removeprefix(MODEL_CAPABILITY).partition("/")
        try:
            model_id = bytes.fromhex(model_hex)
        except ValueError:
            model_id = b""
        cut = int(cut_text) if sep and cut_text.isdigit() and len(cut_text) <= 5 else -1
        if len(model_id) != 32 or not 0 <= cut < 1 << 16:
            raise RemoteProtocolError(f"malformed capability {text!r}", code=ErrorCode.MALFORMED)
        wanted.append((model_id, cut))
    return wanted
