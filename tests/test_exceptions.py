from __future__ import annotations

import inspect

import secure_ci.exceptions as exc_mod
from secure_ci.exceptions import ProtocolError, RemoteProtocolError, SecureCIError


def test_every_exception_derives_from_the_root_and_is_drawn_in_the_docstring() -> None:
    doc = exc_mod.__doc__ or ""
    for name in exc_mod.__all__:
        cls = getattr(exc_mod, name)
        assert inspect.isclass(cls)
        assert issubclass(cls, SecureCIError)
        assert name in doc, f"{name} missing from the tree in the module docstring"


def test_protocol_errors_carry_code_reason_and_blame() -> None:
    err = RemoteProtocolError("frame too large", code=7)
    assert isinstance(err, ProtocolError)
    assert (err.code, err.reason, err.remote) == (7, "frame too large", True)
