"""The README's walkthrough, run literally: every command line of its ``sh`` blocks, in order,
as separate processes (a chain, an edge, a device, an auditor), in one fresh directory.

Then what the README promises when things go wrong: the edge is killed with SIGKILL three
times while a device streams tasks and restarted with the README's own command, the chain is
killed and restarted empty and the deployment redone; after all of it, every task the device
got a result for is anchored exactly once and verifies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secure_ci.ledger import find_anvil

README = Path(__file__).resolve().parents[1] / "README.md"
OWN_TERMINAL = re.compile(r'^# own terminal: ready when it prints "(.+)"$')
STEP_SECONDS = 600  # any one command; the whole test is bounded by pytest's timeout
PORTS = (8545, 7443)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anvil,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(find_anvil() is None, reason="anvil missing (run `make node`)"),
]


def walkthrough_blocks() -> list[str]:
    """The ``sh`` blocks of the README's walkthrough section, in order."""
    text = README.read_text()
    start = text.index("## Walkthrough")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


@dataclass
class Background:
    """A long-running command of the walkthrough, in its own process group."""

    command: str
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class Shell:
    """Runs walkthrough commands in one directory, as a user's shell would."""

    cwd: Path
    env: dict[str, str]
    background: list[Background] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, script: str, *, check: bool = True) -> str:
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.cwd, env=self.env,
            capture_output=True, text=True, timeout=STEP_SECONDS, check=False,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        if check:
            assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
        for name, value in re.findall(r"^export (\w+)=(\S+)$", script, flags=re.M):
            self.env[name] = value  # the user's shell keeps what a block exported
        return done.stdout

    def start(self, command: str, ready: str, name: str) -> Background:
        log = self.cwd / f"{name}-{len(self.background)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"], cwd=self.cwd, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        started = Background(command, log, process)
        self.background.append(started)
        began = time.monotonic()
        deadline = began + STEP_SECONDS
        while ready not in started.output():
            assert process.poll() is None, f"{command} exited:\n{started.output()}"
            assert time.monotonic() < deadline, f"{command} never printed {ready!r}"
            time.sleep(0.1)
        self.timings[f"{name} ready (s)"] = round(time.monotonic() - began, 2)
        return started


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    busy = [p for p in PORTS if not _free(p)]
    assert not busy, f"the walkthrough needs ports {busy} on 127.0.0.1: something else holds them"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env["PYTHONUNBUFFERED"] = "1"
    sh = Shell(tmp_path, env)
    try:
        yield sh
    finally:
        for started in sh.background:
            started.kill()


def _rows(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _names(block: str) -> str:
    return "chain" if "ledger up" in block else "edge"


def test_the_readme_walkthrough_then_kills_and_a_chain_restart(shell: Shell) -> None:
    blocks = walkthrough_blocks()
    assert len(blocks) >= 8
    outputs: dict[int, str] = {}
    commands: dict[str, str] = {}
    for index, block in enumerate(blocks):
        first, _, rest = block.partition("\n")
        ready = OWN_TERMINAL.match(first)
        if ready:
            command = rest.strip()
            commands[_names(block)] = command
            shell.start(command, ready.group(1), _names(block))
            continue
        began = time.monotonic()
        outputs[index] = shell.run(block)
        if "device infer" in block:
            shell.timings["device infer, 8 inputs (s)"] = round(time.monotonic() - began, 2)
    # The classifications are right: labels from `model samples`, argmax from `device infer`.
    infer_block = next(i for i, b in enumerate(blocks) if "device infer" in b)
    infer_out = outputs[infer_block]
    labels = [int(x) for x in re.search(r"^labels (.*)$", infer_out, re.M).group(1).split()]  # type: ignore[union-attr]
    rows = _rows(infer_out)
    assert sorted(str(r["input"]) for r in rows) == [f"digits.npy[{i}]" for i in range(8)]
    predicted = {str(r["input"]): r["argmax"] for r in rows}
    assert [predicted[f"digits.npy[{i}]"] for i in range(8)] == labels
    edge = commands["edge"]
    device_infer = next(line for line in blocks[infer_block].splitlines() if "device infer" in line)
    receipts_check = next(
        line for b in blocks for line in b.splitlines() if "device receipts --check" in line
    )
    audit = "secure-ci audit verify --all --deployment deployment.json"

    # kill -9 of the edge mid-stream, three times, restarted with the README's command
    shell.run("secure-ci model samples --count 96 --out many.npy")
    stream = device_infer.replace("digits.npy", "many.npy")
    for round_ in range(3):
        log = shell.cwd / f"stream-{round_}.out"
        log.touch()
        device = subprocess.Popen(
            ["bash", "-c", f"exec {stream} >> {log} 2>&1"], cwd=shell.cwd, env=shell.env,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + STEP_SECONDS
            while log.read_text().count("\n") < 10 + 20 * round_ and device.poll() is None:
                assert time.monotonic() < deadline, "the device never got results"
                time.sleep(0.02)
            shell.background[-1].kill()  # the edge: kill -9 while results stream
            device.wait(timeout=STEP_SECONDS)
        finally:
            if device.poll() is None:
                os.killpg(device.pid, signal.SIGKILL)
                device.wait(timeout=30)
        assert "Traceback" not in log.read_text(), log.read_text()
        shell.start(edge, "devices registered", "edge")
    shell.run(device_infer)  # the restarted edge serves again

    # the chain dies and comes back empty; the owner redeploys and onboards again
    shell.background[0].kill()
    shell.start(commands["chain"], "Ctrl-C to stop", "chain")
    owner = next(b for b in blocks if "ledger deploy" in b)
    shell.run(owner.replace("--out deployment.json", "--out deployment.json --replace"))
    for onboarding in ("ledger device register", "ledger model register"):
        line = next(x for b in blocks for x in b.splitlines() if onboarding in x)
        shell.run(line)
    # tasks are long past their deadline now: give the edge time to re-anchor, no challenge
    journalled = _until_all_anchored(shell, f"{receipts_check} --grace 3600")
    began = time.monotonic()
    verified = shell.run(audit)
    seconds = time.monotonic() - began
    shell.timings["audit verify --all (s)"] = round(seconds, 2)
    counts = re.search(r"(\d+) of (\d+) tasks verified", verified)
    assert counts is not None, verified
    ok, total = int(counts.group(1)), int(counts.group(2))
    # every task the device got a result for is anchored (above) and verifies; the chain may
    # hold a few more: records the edge journalled but could not answer before its kill -9
    assert ok == total >= journalled, verified
    # anchored exactly once: no (device, task id) twice, however often the edge restarted
    export = shell.run("secure-ci audit export --deployment deployment.json")
    rows = [json.loads(line) for line in export.splitlines()]
    assert len(rows) == total
    assert len({(r["device"], r["task_id"]) for r in rows}) == total
    status = json.loads(shell.run("secure-ci ledger status --deployment deployment.json --json"))
    assert sum(e["records"] for e in status["edges"]) == total
    print("walkthrough timings:", json.dumps(shell.timings))


def _until_all_anchored(shell: Shell, check: str) -> int:
    """Run the device's receipt check until every journalled task is anchored; the count."""
    deadline = time.monotonic() + STEP_SECONDS
    while True:
        out = shell.run(check)
        summary = re.search(
            r"(\d+) task\(s\): (\d+) answered, (\d+) anchored, (\d+) challenged", out
        )
        assert summary is not None, out
        total, _, anchored, challenged = (int(g) for g in summary.groups())
        assert challenged == 0, out
        if anchored == total:
            return total
        assert time.monotonic() < deadline, f"tasks never anchored:\n{out}"
        time.sleep(1.0)
