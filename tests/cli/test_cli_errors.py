"""Every user-facing error path: one line on stderr, never a traceback, and the exit code the
README promises (1 rejected or failed, 2 usage or configuration, 130 interrupted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_ci.cli import exit_code
from secure_ci.exceptions import ChainError, ConfigError
from secure_ci.ledger import find_anvil

BIN = Path(sys.executable).parent / "secure-ci"
PASS = {"DEVICE_PASS": "s3cret-passphrase"}


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> (
    subprocess.CompletedProcess[str]
):  # fmt: skip
    done = subprocess.run(
        [str(BIN), *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


def refused(code: int, text: str, *args: str, cwd: Path, **kw: object) -> str:
    done = run(*args, cwd=cwd, **kw)  # type: ignore[arg-type]
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    assert text in lines[0], lines[0]
    return lines[0]


def test_version(tmp_path: Path) -> None:
    done = run("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("secure-ci ")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"")
    refused(2, "say which ledger", "audit", "tasks", "--rpc", "http://127.0.0.1:1", cwd=tmp_path)
    refused(2, "say which ledger", "ledger", "edges", cwd=tmp_path)
    refused(
        2, "--deployment FILE", "device", "infer", "x.npy", "--identity", "k", "--policy", "p",
        cwd=tmp_path,
    )  # fmt: skip
    refused(2, "no device journal", "device", "receipts", "--journal", "j.sqlite", cwd=tmp_path)
    refused(2, "one TASK id, or --all", "audit", "verify", "--rpc", "http://x", cwd=tmp_path)
    refused(2, "cannot read edge config", "edge", "serve", "--config", "none.toml", cwd=tmp_path)
    (tmp_path / "bad.toml").write_text("[ledger]\nrpc = 3\n")
    refused(2, "[[models]]", "edge", "serve", "--config", "bad.toml", cwd=tmp_path)
    (tmp_path / "deployment.json").write_text("{}")
    refused(
        2, "exactly the keys", "ledger", "status", "--deployment", "deployment.json", cwd=tmp_path
    )


def test_messages_with_brackets_print_literally(tmp_path: Path) -> None:
    (tmp_path / "edge.toml").write_text('provider = "simulated"\n[[models]]\nzoo = "digits_cnn"\n'
                                        'cuts = [2]\n[ledger]\nparty_id = 1\n')  # fmt: skip
    line = refused(2, "[ledger] needs", "edge", "serve", "--config", "edge.toml", cwd=tmp_path)
    assert "[ledger]" in line


def test_keystores(tmp_path: Path) -> None:
    made = run(
        "device", "keygen", "--out", "cam.json", "--passphrase-env", "DEVICE_PASS",
        "--scrypt-n", "1024", cwd=tmp_path, env=PASS,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    keystore = json.loads((tmp_path / "cam.json").read_text())
    assert keystore["version"] == 3
    assert (tmp_path / "cam.json").stat().st_mode & 0o077 == 0
    address = made.stdout.split()[1]
    assert address.lower().endswith(keystore["address"].lower())
    refused(
        2, "never overwrites", "device", "keygen", "--out", "cam.json", "--passphrase-env",
        "DEVICE_PASS", cwd=tmp_path, env=PASS,
    )  # fmt: skip
    refused(
        2, "is not set", "device", "keygen", "--out", "b.json", "--passphrase-env", "NOPE_X",
        cwd=tmp_path,
    )  # fmt: skip
    register = ["ledger", "device", "register", "--identity", "cam.json", "--party", "1",
                "--key-file", "cam.json", "--deployment", "deployment.json"]  # fmt: skip
    refused(2, "wrong passphrase", *register, "--passphrase-env", "DEVICE_PASS", cwd=tmp_path,
            env={"DEVICE_PASS": "wrong"})  # fmt: skip
    refused(2, "needs a passphrase", *register, cwd=tmp_path)  # no tty, no passphrase option
    (tmp_path / "hex.key").write_text("zz" * 32)
    refused(2, "keystore or a 32-byte hex", "ledger", "deploy", "--key-file", "hex.key",
            cwd=tmp_path)  # fmt: skip


def test_an_unreachable_chain_is_a_failure_not_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "owner.key").write_text("11" * 32)
    refused(
        1, "Cannot connect", "ledger", "deploy", "--key-file", "owner.key", "--rpc",
        "http://127.0.0.1:9", cwd=tmp_path,
    )  # fmt: skip


def test_exception_groups_are_unwrapped(capsys: pytest.CaptureFixture[str]) -> None:
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [ConfigError("bad [x]")])])
    assert exit_code(nested) == 2
    assert exit_code(ExceptionGroup("g", [ChainError("node gone")])) == 1
    assert exit_code(KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert "error: bad [x]" in err
    assert "error: node gone" in err
    with pytest.raises(ExceptionGroup):
        exit_code(ExceptionGroup("bug", [ZeroDivisionError()]))  # a bug stays a traceback


def _busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    yield from _busy_port()


def _start(args: list[str], cwd: Path, ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(BIN), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    seen = ""
    while ready not in seen:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, seen
        seen += line
        assert time.monotonic() < deadline, seen
    return proc


@pytest.mark.anvil
@pytest.mark.skipif(find_anvil() is None, reason="anvil missing (run `make node`)")
def test_ledger_up_stops_anvil_on_sigterm_and_sigint(tmp_path: Path, busy_port: int) -> None:
    refused(2, "is in use", "ledger", "up", "--port", str(busy_port), cwd=tmp_path)
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = _start(["ledger", "up", "--port", str(port)], tmp_path, "Ctrl-C to stop")
        try:
            anvils = _children(proc.pid)
            assert anvils, "ledger up started no anvil"
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == code, _rest(proc)
            assert not [p for p in anvils if Path(f"/proc/{p}").exists()], "anvil left running"
        finally:
            _stop(proc)


def _rest(proc: subprocess.Popen[str]) -> str:
    return proc.stdout.read() if proc.stdout is not None else ""


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _edge_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "edge.toml"
    config.write_text(
        f"""provider = "simulated"
state_dir = "state"
allowed_devices = []
[listen]
host = "127.0.0.1"
port = {port}
[[models]]
zoo = "digits_cnn"
cuts = [2]
[simulated]
mrenclave = "{"5e" * 32}"
mrsigner = "{"a1" * 32}"
export_dir = "pki"
"""
    )
    return config


def test_one_edge_per_state_dir_and_ctrl_c_exits_130(tmp_path: Path, busy_port: int) -> None:
    _edge_config(tmp_path, 0)
    first = _start(["edge", "serve", "--config", "edge.toml"], tmp_path, "ready")
    try:
        exported = (tmp_path / "pki" / "dev-root.pem").read_bytes()
        refused(2, "another edge", "edge", "serve", "--config", "edge.toml", cwd=tmp_path)
        assert (tmp_path / "pki" / "dev-root.pem").read_bytes() == exported  # untouched
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130, _rest(first)
    finally:
        _stop(first)
    # a port in use is one line, and the restarted edge's dev PKI did not change
    _edge_config(tmp_path, busy_port)
    refused(1, "cannot listen", "edge", "serve", "--config", "edge.toml", cwd=tmp_path)
    assert (tmp_path / "pki" / "dev-root.pem").read_bytes() == exported
