"""Governance of parties and releases (k of n, notice period, suspensions) and every revert,
on the in-process EVM and on the pinned anvil when it is there."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import pytest_asyncio
from eth_account import Account
from eth_account.signers.local import LocalAccount

from secure_ci.exceptions import ConfigError, ContractRevertError, LedgerError, RecordError
from secure_ci.ledger import AnvilNode, LedgerClient, find_anvil, open_ledger, run_anvil
from secure_ci.ledger._connect import GovernanceSettings
from secure_ci.ledger._governance import (
    OP_ADD_PARTY,
    OP_ADD_RELEASE,
    OP_LIFT_SUSPENSION,
    RELEASE_MEASUREMENT,
    RELEASE_MODEL,
    proposal_id,
)
from secure_ci.ledger._records import keccak256

pytestmark = pytest.mark.asyncio(loop_scope="module")
M = keccak256(b"a measurement")
DAY = 86_400
Deploy = Callable[..., AbstractAsyncContextManager[tuple[LedgerClient, list[LocalAccount]]]]


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilNode]:
    if find_anvil() is None:
        pytest.skip("anvil missing from ledger/node_modules (run `make node`)")
    with run_anvil() as node:
        yield node


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["inprocess", "anvil"])
async def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "anvil":
        return str(request.getfixturevalue("anvil").url)
    return "inprocess"


@pytest.fixture
def deploy(backend: str) -> Deploy:
    """A fresh contract whose deployer is party 1 and ``parties - 1`` funded founders follow."""

    @asynccontextmanager
    async def opened(
        parties: int = 1, threshold: int = 1, notice: int = 0
    ) -> AsyncIterator[tuple[LedgerClient, list[LocalAccount]]]:
        founders = [Account.create() for _ in range(parties - 1)]
        settings = GovernanceSettings(tuple(f.address for f in founders), threshold, notice)
        async with open_ledger(backend, governance=settings) as ledger:
            for account in founders:
                await ledger.fund(account.address, 10**19)
            yield ledger, [ledger.owner, *founders]

    return opened


async def reverts(name: str, coro: object) -> None:
    with pytest.raises(ContractRevertError) as info:
        await coro  # type: ignore[misc]
    assert info.value.reason == name


async def _raw(ledger: LedgerClient, account: LocalAccount, fn: str, *args: object) -> None:
    """Send a call the client would refuse to build (to reach the contract's own check)."""
    await ledger._transact(account, getattr(ledger._contract.functions, fn)(*args))


async def _window(ledger: LedgerClient, days: int = 7) -> tuple[int, int]:
    now = await ledger.timestamp()
    return now, now + days * DAY


async def test_single_party_walkthrough_defaults(deploy: Deploy) -> None:
    async with deploy() as (ledger, (owner,)):
        assert (await ledger.threshold(), await ledger.notice_period()) == (1, 0)
        assert await ledger.party_count() == 1
        assert await ledger.party_of(owner.address) == 1
        assert await ledger.contract_owner() == owner.address
        admin = Account.create()
        assert await ledger.register_party(admin.address) == 2
        await ledger.allow_measurement(M)
        assert await ledger.is_allowed_measurement(M)
        release = await ledger.release(RELEASE_MEASUREMENT, M)
        now = await ledger.timestamp()
        assert release.exists
        assert release.state_at(now) == "valid"
        assert 7 * DAY - 60 < release.not_after - release.not_before <= 7 * DAY


async def test_proposal_ids_are_the_keccak_of_the_action(deploy: Deploy) -> None:
    async with deploy() as (ledger, (owner,)):
        admin = Account.create().address
        tx = await ledger.propose_party(owner, admin)
        assert tx.proposal_id == proposal_id(OP_ADD_PARTY, admin=admin)
        nb, na = await _window(ledger)
        sources = [keccak256(b"source"), keccak256(b"manifest")]
        tx = await ledger.propose_release(owner, RELEASE_MEASUREMENT, M, nb, na, sources)
        assert tx.proposal_id == proposal_id(OP_ADD_RELEASE, 0, M, 0, not_before=nb,
                                             not_after=na, sources=sources)  # fmt: skip
        fn = ledger._contract.functions.proposalId(
            OP_LIFT_SUSPENSION, 1, M, 3, admin, 5, 6, keccak256(b"".join(sources)), 9
        )
        assert await ledger._call(fn) == proposal_id(
            OP_LIFT_SUSPENSION, 1, M, 3, admin, 5, 6, sources, 9
        )
        listed = await ledger.proposals(pending_only=True)
        assert [p.proposal_id for p in listed][-1] == tx.proposal_id
        assert listed[-1].sources == tuple(sources)
        assert "release measurement" in listed[-1].action


async def test_a_single_party_cannot_add_a_release_when_k_is_2(deploy: Deploy) -> None:
    async with deploy(parties=2, threshold=2) as (ledger, (first, second)):
        nb, na = await _window(ledger)
        tx = await ledger.propose_release(first, RELEASE_MEASUREMENT, M, nb, na)
        await reverts("NotEnoughApprovals", ledger.execute(first, tx.proposal_id))
        await reverts("AlreadyApproved", ledger.approve(first, tx.proposal_id))
        with pytest.raises(LedgerError, match="1 of 2 approvals"):
            await ledger.allow_measurement(keccak256(b"other"))
        assert not await ledger.is_allowed_measurement(M)
        approved = await ledger.approve(second, tx.proposal_id)
        assert approved.gas_used > 21_000
        await ledger.execute(second, tx.proposal_id)
        assert await ledger.is_allowed_measurement(M)
        info = await ledger.proposal(tx.proposal_id)
        assert (info.executed, info.approvals) == (True, 2)
        await reverts("ProposalNotPending", ledger.approve(second, tx.proposal_id))
        await reverts("ProposalNotPending", ledger.execute(second, tx.proposal_id))
        await reverts("ProposalExists", ledger.propose_release(first, 0, M, nb, na))
        # any one party suspends at once; lifting needs both
        await ledger.suspend(second, RELEASE_MEASUREMENT, M)
        assert not await ledger.is_allowed_measurement(M)
        lift = await ledger.propose_lift(second, RELEASE_MEASUREMENT, M)
        assert lift.proposal_id == proposal_id(OP_LIFT_SUSPENSION, 0, M, nonce=1)
        await reverts("NotEnoughApprovals", ledger.execute(second, lift.proposal_id))
        await ledger.approve(first, lift.proposal_id)
        await ledger.execute(first, lift.proposal_id)
        assert await ledger.is_allowed_measurement(M)
        # adding a party needs both too
        newcomer = Account.create()
        party = await ledger.propose_party(first, newcomer.address)
        await reverts("NotEnoughApprovals", ledger.execute(first, party.proposal_id))
        await ledger.approve(second, party.proposal_id)
        await ledger.fund(newcomer.address, 10**18)
        await ledger.execute(newcomer, party.proposal_id)  # anyone may execute
        assert await ledger.party_of(newcomer.address) == 3


async def test_notice_period_and_validity_window(deploy: Deploy) -> None:
    async with deploy(notice=3600) as (ledger, (owner,)):
        edge = Account.create()
        nb, na = await _window(ledger)
        tx = await ledger.propose_release(owner, RELEASE_MEASUREMENT, M, nb, na)
        executed = await ledger.execute(owner, tx.proposal_id)
        release = await ledger.release(RELEASE_MEASUREMENT, M)
        mined = await ledger.timestamp()
        assert release.not_before >= mined + 3600 - 5
        assert executed.gas_used > 0
        assert release.state_at(mined) == "not-yet-valid"
        assert not await ledger.is_allowed_measurement(M)
        await ledger.fund(edge.address, 10**18)
        admin = Account.create()
        await ledger.fund(admin.address, 10**18)
        party = await ledger.register_party(admin.address)
        register = ledger.register_edge(admin, party, edge, M, M, "e:1")
        await reverts("ReleaseNotValid", register)
        await ledger.advance_time(3601)
        assert await ledger.is_allowed_measurement(M)
        await ledger.register_edge(admin, party, edge, M, M, "e:1")
        # a renewal of a release already valid needs no new notice
        now, later = await _window(ledger, 30)
        renew = await ledger.propose_release(owner, RELEASE_MEASUREMENT, M, now, later)
        await ledger.execute(owner, renew.proposal_id)
        assert (await ledger.release(RELEASE_MEASUREMENT, M)).not_after == later
        assert await ledger.is_allowed_measurement(M)
        # past its window the release expires
        await ledger.advance_time(31 * DAY)
        assert not await ledger.is_allowed_measurement(M)
        again = ledger.register_edge(admin, party, edge, M, M, "e:2")
        await reverts("ReleaseNotValid", again)
        # a window that the notice period swallows cannot be executed
        short = keccak256(b"short")
        now = await ledger.timestamp()
        brief = await ledger.propose_release(owner, RELEASE_MEASUREMENT, short, now, now + 60)
        await reverts("WindowEnded", ledger.execute(owner, brief.proposal_id))


async def test_governance_reverts(deploy: Deploy) -> None:
    async with deploy(parties=2) as (ledger, (first, second)):
        outsider = Account.create()
        await ledger.fund(outsider.address, 10**18)
        nb, na = await _window(ledger)
        unknown = keccak256(b"no such proposal")
        await reverts("NotParty", ledger.propose_party(outsider, outsider.address))
        await reverts("NotParty", ledger.propose_release(outsider, 0, M, nb, na))
        await reverts("NotParty", ledger.suspend(outsider, 0, M))
        await reverts("ZeroAddress", ledger.propose_party(first, "0x" + "00" * 20))
        await reverts("AdminTaken", ledger.propose_party(first, second.address))
        await reverts("InvalidWindow", ledger.propose_release(first, 0, M, na, nb))
        await reverts("InvalidWindow", ledger.propose_release(first, 0, M, nb, nb))
        await reverts("UnknownParty", ledger.propose_release(first, 0, M, nb, na, party_id=1))
        await reverts("UnknownParty", ledger.propose_release(first, 1, M, nb, na, party_id=9))
        await reverts("NotPartyAdmin", ledger.propose_release(second, 1, M, nb, na, party_id=1))
        await reverts(
            "UnknownReleaseKind", _raw(ledger, first, "proposeRelease", 2, M, 0, nb, na, [])
        )
        many = [keccak256(bytes([i])) for i in range(17)]
        await reverts(
            "TooManySources", _raw(ledger, first, "proposeRelease", 0, M, 0, nb, na, many)
        )
        with pytest.raises(RecordError):
            await ledger.propose_release(first, 0, M, nb, na, many)
        with pytest.raises(RecordError):
            await ledger.suspend(first, 2, M)
        await reverts("UnknownProposal", ledger.approve(first, unknown))
        await reverts("UnknownProposal", ledger.execute(first, unknown))
        await reverts("UnknownProposal", ledger.proposal(unknown))
        await reverts("NotParty", ledger.approve(outsider, unknown))
        await reverts("UnknownRelease", ledger.suspend(first, 0, M))
        await reverts("UnknownRelease", ledger.propose_lift(first, 0, M))
        await ledger.allow_measurement(M)
        await reverts("NotSuspended", ledger.propose_lift(first, 0, M))
        await ledger.suspend(second, 0, M)
        await reverts("AlreadySuspended", ledger.suspend(first, 0, M))
        lift = await ledger.propose_lift(first, 0, M)
        await reverts("ProposalExists", ledger.propose_lift(second, 0, M))
        await reverts("AlreadyApproved", ledger.approve(first, lift.proposal_id))
        await ledger.execute(second, lift.proposal_id)
        # models: two parties race for one model id; the second execution finds it taken
        model = keccak256(b"model")
        by_first = await ledger.propose_release(first, 1, model, nb, na, party_id=1)
        by_second = await ledger.propose_release(second, 1, model, nb, na, party_id=2)
        await ledger.execute(first, by_first.proposal_id)
        assert await ledger.model_party(model) == 1
        await reverts("ModelTaken", ledger.execute(second, by_second.proposal_id))
        await reverts(
            "ModelTaken", ledger.propose_release(second, 1, model, nb, na + 1, party_id=2)
        )
        assert await ledger.release_valid(RELEASE_MODEL, model)


async def test_deployment_settings_are_checked(backend: str) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        GovernanceSettings((), 2)
    with pytest.raises(ConfigError, match="threshold"):
        GovernanceSettings((), 0)
    with pytest.raises(ConfigError, match="twice"):
        GovernanceSettings(("0x" + "11" * 20, "0x" + "11" * 20), 1)
    with pytest.raises(ConfigError, match="notice"):
        GovernanceSettings((), 1, -1)
    # the contract checks them too (a deployment made by other tools)
    from secure_ci.ledger import load_artifact
    from secure_ci.ledger._backends import translate_errors
    from secure_ci.ledger._connect import deploy_contract

    async with open_ledger(backend) as ledger:
        w3, artifact = ledger._w3, load_artifact()
        bad = GovernanceSettings.__new__(GovernanceSettings)
        object.__setattr__(bad, "founders", ())
        object.__setattr__(bad, "threshold", 2)
        object.__setattr__(bad, "notice_period", 0)
        with (
            pytest.raises(ContractRevertError, match="InvalidThreshold"),
            translate_errors(artifact),
        ):
            await deploy_contract(w3, artifact, ledger.owner, 60, bad)
        object.__setattr__(bad, "founders", (ledger.owner.address,))
        object.__setattr__(bad, "threshold", 1)
        with pytest.raises(ContractRevertError, match="AdminTaken"), translate_errors(artifact):
            await deploy_contract(w3, artifact, ledger.owner, 60, bad)


async def test_every_governance_error_has_a_hint() -> None:
    import re

    from secure_ci.exceptions import ContractRevertError as Revert
    from secure_ci.ledger._anvil import default_ledger_dir
    from secure_ci.ledger._hints import REVERT_HINTS, explain

    source = (default_ledger_dir() / "contracts" / "Governance.sol").read_text()
    names = re.findall(r"^\s*error (\w+)\(", source, re.MULTILINE)
    assert len(names) >= 19
    for name in names:
        assert name in REVERT_HINTS, name
    assert "another party" in explain(Revert("AlreadyApproved"))
