"""A miner's own view of the audit chain: the domain and the head it checks requests against.

A miner signs what the ServerApp asks, so everything in the request that the miner can
check for itself, it should: the EIP-712 domain (chain id, contract, run) is taken from
its own configuration and its own read of the chain, not from the request, and the
previous hash it approves must be the chain head it reads itself. Otherwise an operator
could have miners sign for another contract or run, or a round that forks the trail.

The node config names the chain (``bcsfl-chain-url``, a JSON-RPC URL the node can read)
and the contract (``bcsfl-contract``, published by the operator out of band). A node
without them (a simulation on the embedded chain, which only the ServerApp can read)
takes the request's domain on trust, and the trail's ``verify`` checks it afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from eth_utils import is_address, to_checksum_address
from web3 import Web3
from web3.contract import Contract

from bcsfl_flower.approvals import MinerStatement
from bcsfl_flower.chain.compiler import load_artifact
from bcsfl_flower.packets import Eip712Domain

CHAIN_URL_NODE_KEY = "bcsfl-chain-url"
"""Node-config key: the JSON-RPC URL of the audit chain, which the miner reads itself."""

CONTRACT_NODE_KEY = "bcsfl-contract"
"""Node-config key: the address of the run's ``BCSFLAudit`` contract."""


@dataclass(frozen=True)
class OwnChainView:
    """The chain as one miner reads it.

    Attributes
    ----------
    url : str
        The JSON-RPC URL.
    contract : str
        The ``BCSFLAudit`` address (checksummed).
    """

    url: str
    contract: str

    @classmethod
    def of(cls, node_config: Mapping[str, object]) -> OwnChainView | None:
        """Return the view a node config names, or None if it names none.

        Raises
        ------
        ValueError
            If only one of the two keys is set, or the contract is not an address.
        """
        url, contract = node_config.get(CHAIN_URL_NODE_KEY), node_config.get(CONTRACT_NODE_KEY)
        if url is None and contract is None:
            return None
        if not isinstance(url, str) or not isinstance(contract, str) or not is_address(contract):
            raise ValueError(
                f"node config needs both {CHAIN_URL_NODE_KEY!r} (a URL) and "
                f"{CONTRACT_NODE_KEY!r} (an address), got {url!r} and {contract!r}"
            )
        return cls(url, to_checksum_address(contract))

    def domain(self) -> Eip712Domain:
        """Return the signing domain as this node reads it: chain id, contract and run."""
        return _read_domain(self.url, self.contract)

    def fault(self, request_domain: Eip712Domain, signed: MinerStatement) -> str | None:
        """Return why a request does not match this node's chain, or None if it does.

        A chain this node cannot read is a reason too: it signs nothing it cannot check.
        """
        try:
            return self._fault(request_domain, signed)
        except Exception as err:  # any failed read means "cannot check"
            return f"cannot read the chain at {self.url}: {type(err).__name__}: {err}"

    def _fault(self, request_domain: Eip712Domain, signed: MinerStatement) -> str | None:
        own = self.domain()
        if request_domain != own:
            return (
                f"the request signs for chain {request_domain.chain_id}, contract "
                f"{request_domain.verifying_contract}, run 0x{request_domain.run.hex()}; this "
                f"node reads chain {own.chain_id}, contract {own.verifying_contract}, run "
                f"0x{own.run.hex()}"
            )
        contract = _contract(self.url, self.contract)
        start = signed.start_hash
        if not contract.functions.isLatestModel(start).call():
            return f"0x{start.hex()} is not the chain head this node reads"
        following = int(contract.functions.latestRound().call()) + 1
        if signed.round != following:
            return f"the chain this node reads is at round {following}, not {signed.round}"
        return None


@functools.lru_cache(maxsize=8)
def _contract(url: str, address: str) -> Contract:
    web3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 10}))
    return web3.eth.contract(address=to_checksum_address(address), abi=load_artifact()["abi"])


@functools.lru_cache(maxsize=8)
def _read_domain(url: str, address: str) -> Eip712Domain:
    contract = _contract(url, address)
    return Eip712Domain(
        int(contract.w3.eth.chain_id), address, bytes(contract.functions.runId().call())
    )
