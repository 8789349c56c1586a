// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title BCSFLAudit
/// @author bcsfl-flower
/// @notice On-chain audit trail of a BCS-FL federation. Every committed round anchors the
/// hash of its global model, linked to the previously anchored hash, and only with a quorum
/// certificate: at least ceil(2N/3) EIP-712 `RoundApproval` signatures from the round's N
/// miners. Rounds that roll back are recorded as events, so the sequence of rounds has no gaps.
/// @dev The contract is self-contained on purpose: it hand-writes the two small pieces it
/// would otherwise take from OpenZeppelin (an owner check and the EIP-712 domain separator).
/// The compiled artifact ships inside the Python package and is rebuilt offline from this one
/// file, so it must compile without a package manager or remappings.
///
/// Gas per anchored round does not depend on the number of registered clients: a round
/// stores one slot (its model hash); the accepted packets and the committee are committed as
/// roots, the miners travel in calldata, and only the signers' registration slots are read.
/// The remaining fields of a round are emitted in {RoundAnchored}; logs are committed by the
/// block's receipts root as firmly as storage is by the state root, at a fraction of the cost.
contract BCSFLAudit {
    // ------------------------------------------------------------------------------------
    // Types
    // ------------------------------------------------------------------------------------

    /// @notice The statement a miner signs to approve a round (EIP-712 struct `RoundApproval`).
    /// @param round The federated round being anchored (the genesis model is round 0).
    /// @param modelHash Canonical SHA-256 hash of the committed global model.
    /// @param previousHash Model hash of the last anchored round (the hash-chain link).
    /// @param acceptedRoot Commitment to the client packets accepted into this round.
    /// @param committeeRoot keccak256 of the committee: the miners' addresses, ascending,
    /// each left-padded to 32 bytes (`abi.encodePacked(address[])`).
    /// @param timestamp Unix time (seconds) at which the candidate package was built.
    struct RoundApproval {
        uint64 round;
        bytes32 modelHash;
        bytes32 previousHash;
        bytes32 acceptedRoot;
        bytes32 committeeRoot;
        uint64 timestamp;
    }

    // ------------------------------------------------------------------------------------
    // Constants and immutables
    // ------------------------------------------------------------------------------------

    /// @notice EIP-712 type hash of {RoundApproval}.
    bytes32 public constant ROUND_APPROVAL_TYPEHASH = keccak256(
        "RoundApproval(uint64 round,bytes32 modelHash,bytes32 previousHash,"
        "bytes32 acceptedRoot,bytes32 committeeRoot,uint64 timestamp)"
    );

    /// @notice Largest committee accepted by {anchorRound}; bounds the work of one anchor.
    uint256 public constant MAX_COMMITTEE_SIZE = 64;

    bytes32 private constant _DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    bytes32 private constant _NAME_HASH = keccak256("BCSFLAudit");
    bytes32 private constant _VERSION_HASH = keccak256("1");

    /// @dev secp256k1n / 2. Signatures with a larger `s` are malleable copies and rejected.
    uint256 private constant _HALF_CURVE_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    /// @notice The operator: the only account that registers clients, anchors rounds and
    /// records rollbacks. Fixed at deployment: an audit trail whose operator could change
    /// hands mid-run would be weaker evidence, and an immutable saves a storage read per call.
    address public immutable owner;

    bytes32 private immutable _cachedDomainSeparator;
    uint256 private immutable _cachedChainId;

    // ------------------------------------------------------------------------------------
    // Storage
    // ------------------------------------------------------------------------------------

    // Slot 0, read and written once per anchor.
    uint64 private _lastRound;
    uint64 private _lastAnchoredRound;
    uint64 private _anchoredCount;
    uint64 private _rollbackCount;

    uint256 private _clientCount;
    mapping(address client => bool registered) private _registered;
    mapping(uint64 round => bytes32 modelHash) private _modelHashOf;

    // ------------------------------------------------------------------------------------
    // Events
    // ------------------------------------------------------------------------------------

    /// @notice Emitted once, at deployment, with the hash of the initial global model.
    /// @param modelHash The genesis model hash (round 0); may be zero when unknown.
    event GenesisAnchored(bytes32 indexed modelHash);

    /// @notice Emitted when a client is registered.
    /// @param client The client's address.
    /// @param stake The client's stake at registration, in the federation's own units.
    event ClientRegistered(address indexed client, uint96 stake);

    /// @notice Emitted when a round is anchored with a valid quorum certificate.
    /// @param round The anchored round.
    /// @param modelHash The round's global model hash.
    /// @param previousHash The hash it links to (the last anchored model hash).
    /// @param acceptedRoot Commitment to the accepted client packets.
    /// @param committeeRoot Commitment to the round's miners.
    /// @param timestamp The candidate package's timestamp, as signed by the miners.
    /// @param committeeSize Number of miners in the committee (N).
    /// @param signerCount Number of valid approvals in the certificate.
    event RoundAnchored(
        uint64 indexed round,
        bytes32 indexed modelHash,
        bytes32 previousHash,
        bytes32 acceptedRoot,
        bytes32 committeeRoot,
        uint64 timestamp,
        uint256 committeeSize,
        uint256 signerCount
    );

    /// @notice Emitted when a round commits no new model and the federation keeps the last one.
    /// @param round The round that rolled back.
    /// @param keptModelHash The model hash the federation keeps (the last anchored one).
    /// @param reason Human-readable reason, e.g. "validator quorum not reached".
    event RoundRolledBack(uint64 indexed round, bytes32 indexed keptModelHash, string reason);

    // ------------------------------------------------------------------------------------
    // Errors
    // ------------------------------------------------------------------------------------

    /// @notice The caller is not the owner.
    error NotOwner(address caller);
    /// @notice The zero address cannot be registered.
    error ZeroAddress();
    /// @notice The address is already registered.
    error AlreadyRegistered(address client);
    /// @notice Two parallel arrays differ in length.
    error LengthMismatch(uint256 left, uint256 right);
    /// @notice Rounds are consecutive: every round is either anchored or rolled back.
    error UnexpectedRound(uint64 expected, uint64 got);
    /// @notice The previous hash does not equal the last anchored model hash.
    error BrokenHashLink(bytes32 expected, bytes32 got);
    /// @notice A round cannot anchor the zero hash.
    error ZeroModelHash();
    /// @notice The committee is empty or larger than {MAX_COMMITTEE_SIZE}.
    error InvalidCommitteeSize(uint256 size);
    /// @notice Committee addresses must be strictly ascending (hence distinct and non-zero).
    error CommitteeNotSorted(uint256 index);
    /// @notice The signed committee root does not match the committee passed in.
    error CommitteeRootMismatch(bytes32 expected, bytes32 got);
    /// @notice The signatures blob is not a whole number of 65-byte signatures.
    error MalformedSignatures(uint256 length);
    /// @notice Fewer approvals than ceil(2N/3).
    error QuorumNotReached(uint256 approvals, uint256 required);
    /// @notice A signature is malformed: `v` not 27/28, `s` in the upper half, or unrecoverable.
    error InvalidSignature(uint256 index);
    /// @notice A signature recovers to an address that is not in the committee.
    error SignerNotInCommittee(address signer);
    /// @notice Signatures must be sorted by signer, strictly ascending (hence one per miner):
    /// the signer of signature `index` is a committee member at or before the previous one.
    error SignaturesNotSorted(uint256 index, address signer);
    /// @notice A signer is neither registered nor the owner.
    error SignerNotEligible(address signer);
    /// @notice No model is anchored for that round.
    error RoundNotAnchored(uint64 round);

    // ------------------------------------------------------------------------------------
    // Construction and access control
    // ------------------------------------------------------------------------------------

    /// @notice Deploy the trail, owned by the deployer, starting from the initial model.
    /// @param genesisModelHash Canonical hash of the initial global model (round 0); the
    /// first anchored round must link to it. Zero is allowed when the initial model is
    /// unknown, and the first round then links to zero.
    constructor(bytes32 genesisModelHash) {
        owner = msg.sender;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
        _modelHashOf[0] = genesisModelHash;
        emit GenesisAnchored(genesisModelHash);
    }

    /// @dev Reverts with {NotOwner} unless the caller is the owner.
    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    // ------------------------------------------------------------------------------------
    // Registration
    // ------------------------------------------------------------------------------------

    // Registration is permanent: an address, once registered, stays eligible to sign. The
    // stake is recorded in {ClientRegistered} only; the contract never reads it (the
    // federation's stake ledger is kept off chain), so it is not stored.

    /// @notice Register a client with its stake.
    /// @param client The client's signing address.
    /// @param stake The client's stake, emitted in {ClientRegistered}.
    function registerClient(address client, uint96 stake) external onlyOwner {
        _register(client, stake);
    }

    /// @notice Register several clients in one transaction.
    /// @param clients The clients' signing addresses.
    /// @param stakes Their stakes, in the same order.
    function registerClients(address[] calldata clients, uint96[] calldata stakes)
        external
        onlyOwner
    {
        if (clients.length != stakes.length) revert LengthMismatch(clients.length, stakes.length);
        for (uint256 i = 0; i < clients.length; ++i) {
            _register(clients[i], stakes[i]);
        }
    }

    // ------------------------------------------------------------------------------------
    // Rounds
    // ------------------------------------------------------------------------------------

    /// @notice Anchor a committed round with its miners' quorum certificate.
    /// @dev Checks, in order: the round follows the last recorded one; the previous hash
    /// is the last anchored model hash; the committee is valid and matches its signed root;
    /// at least ceil(2N/3) signatures, sorted by signer address, each a canonical
    /// (low-s, v in {27, 28}) signature of the EIP-712 digest of `approval` by a distinct
    /// committee member who is registered (or is the owner, the fallback signer when no
    /// client can mine). Non-signing committee members are not looked up: listing an
    /// ineligible miner can only raise the quorum, never lower it.
    /// @param approval The approved statement; the same struct every miner signed.
    /// @param miners The round's whole committee, strictly ascending.
    /// @param signatures Concatenated 65-byte signatures (r, s, v), sorted by signer address.
    function anchorRound(
        RoundApproval calldata approval,
        address[] calldata miners,
        bytes calldata signatures
    ) external onlyOwner {
        uint64 round = approval.round;
        uint64 lastRound = _lastRound;
        if (round != lastRound + 1) revert UnexpectedRound(lastRound + 1, round);
        uint64 lastAnchored = _lastAnchoredRound;
        bytes32 head = _modelHashOf[lastAnchored];
        if (approval.previousHash != head) revert BrokenHashLink(head, approval.previousHash);
        if (approval.modelHash == bytes32(0)) revert ZeroModelHash();

        uint256 approvals = _verifyCertificate(approval, miners, signatures);

        _modelHashOf[round] = approval.modelHash;
        _lastRound = round;
        _lastAnchoredRound = round;
        _anchoredCount += 1;
        emit RoundAnchored(
            round,
            approval.modelHash,
            approval.previousHash,
            approval.acceptedRoot,
            approval.committeeRoot,
            approval.timestamp,
            miners.length,
            approvals
        );
    }

    /// @notice Record that a round rolled back: it commits no new model.
    /// @dev No certificate is required: a rollback changes no anchored hash, so a forged
    /// one could only delay the federation, which the owner can do anyway by not anchoring.
    /// @param round The round that rolled back; must follow the last recorded round.
    /// @param keptModelHash The model the federation keeps; must be the last anchored hash.
    /// @param reason Human-readable reason for the rollback.
    function recordRollback(uint64 round, bytes32 keptModelHash, string calldata reason)
        external
        onlyOwner
    {
        uint64 lastRound = _lastRound;
        if (round != lastRound + 1) revert UnexpectedRound(lastRound + 1, round);
        bytes32 head = _modelHashOf[_lastAnchoredRound];
        if (keptModelHash != head) revert BrokenHashLink(head, keptModelHash);
        _lastRound = round;
        _rollbackCount += 1;
        emit RoundRolledBack(round, keptModelHash, reason);
    }

    // ------------------------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------------------------

    /// @notice The last anchored round and its model hash (the paper's `getLatestModel`).
    /// @return round The last anchored round (0 before any anchor: the genesis).
    /// @return modelHash Its model hash.
    function getLatestModel() external view returns (uint64 round, bytes32 modelHash) {
        round = _lastAnchoredRound;
        modelHash = _modelHashOf[round];
    }

    /// @notice The model hash anchored for a round.
    /// @param round The round (0 is the genesis).
    /// @return modelHash The anchored hash; reverts with {RoundNotAnchored} if none.
    function getRound(uint64 round) external view returns (bytes32 modelHash) {
        modelHash = _modelHashOf[round];
        if (round != 0 && modelHash == bytes32(0)) revert RoundNotAnchored(round);
    }

    /// @notice The anchored rounds in `[fromRound, toRound]` (the paper's `getBlockchain`).
    /// @dev Rolled-back rounds are skipped; they appear as {RoundRolledBack} events. Meant
    /// for `eth_call`; page through long trails with narrower ranges.
    /// @param fromRound First round of the range, inclusive (0 includes the genesis).
    /// @param toRound Last round of the range, inclusive; clamped to {latestRound}.
    /// @return rounds The anchored rounds in the range, ascending.
    /// @return modelHashes Their model hashes.
    function getBlockchain(uint64 fromRound, uint64 toRound)
        external
        view
        returns (uint64[] memory rounds, bytes32[] memory modelHashes)
    {
        uint64 last = _lastRound;
        if (toRound > last) toRound = last;
        uint256 capacity = toRound >= fromRound ? uint256(toRound - fromRound) + 1 : 0;
        rounds = new uint64[](capacity);
        modelHashes = new bytes32[](capacity);
        uint256 count = 0;
        for (uint256 r = fromRound; r <= toRound && capacity != 0; ++r) {
            bytes32 h = _modelHashOf[uint64(r)];
            if (r == 0 || h != bytes32(0)) {
                rounds[count] = uint64(r);
                modelHashes[count] = h;
                ++count;
            }
        }
        assembly ("memory-safe") {
            mstore(rounds, count)
            mstore(modelHashes, count)
        }
    }

    /// @notice The last recorded round, anchored or rolled back.
    /// @return The round number (0 before the first round).
    function latestRound() external view returns (uint64) {
        return _lastRound;
    }

    /// @notice Number of anchored rounds, not counting the genesis.
    /// @return The count.
    function roundCount() external view returns (uint64) {
        return _anchoredCount;
    }

    /// @notice Number of rolled-back rounds.
    /// @return The count.
    function rollbackCount() external view returns (uint64) {
        return _rollbackCount;
    }

    /// @notice Number of registered clients.
    /// @return The count.
    function clientCount() external view returns (uint256) {
        return _clientCount;
    }

    /// @notice Whether an address is registered.
    /// @param client The address.
    /// @return True if registered.
    function isRegistered(address client) external view returns (bool) {
        return _registered[client];
    }

    /// @notice The EIP-712 domain separator of this contract on the current chain.
    /// @return The domain separator.
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparator();
    }

    /// @notice The EIP-712 digest a miner signs for `approval`.
    /// @param approval The statement.
    /// @return The digest `keccak256("\x19\x01" || domainSeparator || structHash)`.
    function approvalDigest(RoundApproval calldata approval) external view returns (bytes32) {
        return _approvalDigest(approval);
    }

    /// @notice The minimum number of approvals for a committee of `committeeSize` miners.
    /// @param committeeSize N.
    /// @return ceil(2N/3).
    function quorum(uint256 committeeSize) public pure returns (uint256) {
        return (2 * committeeSize + 2) / 3;
    }

    /// @notice The EIP-712 domain (EIP-5267), so off-chain tools can rebuild signatures.
    /// @return fields Bitmap of the fields used (name, version, chainId, verifyingContract).
    /// @return name "BCSFLAudit".
    /// @return version "1".
    /// @return chainId The current chain id.
    /// @return verifyingContract This contract.
    /// @return salt Unused (zero).
    /// @return extensions Unused (empty).
    function eip712Domain()
        external
        view
        returns (
            bytes1 fields,
            string memory name,
            string memory version,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        )
    {
        return (hex"0f", "BCSFLAudit", "1", block.chainid, address(this), bytes32(0), extensions);
    }

    // ------------------------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------------------------

    /// @dev Register one client; reverts on the zero address or a second registration.
    function _register(address client, uint96 stake) private {
        if (client == address(0)) revert ZeroAddress();
        if (_registered[client]) revert AlreadyRegistered(client);
        _registered[client] = true;
        ++_clientCount;
        emit ClientRegistered(client, stake);
    }

    /// @dev Verify the certificate and return the number of approvals; reverts otherwise.
    function _verifyCertificate(
        RoundApproval calldata approval,
        address[] calldata miners,
        bytes calldata signatures
    ) private view returns (uint256 approvals) {
        uint256 size = miners.length;
        if (size == 0 || size > MAX_COMMITTEE_SIZE) revert InvalidCommitteeSize(size);
        for (uint256 i = 1; i < size; ++i) {
            if (miners[i - 1] >= miners[i]) revert CommitteeNotSorted(i);
        }
        if (miners[0] == address(0)) revert CommitteeNotSorted(0);
        bytes32 root = keccak256(abi.encodePacked(miners));
        if (root != approval.committeeRoot) revert CommitteeRootMismatch(root, approval.committeeRoot);

        if (signatures.length % 65 != 0) revert MalformedSignatures(signatures.length);
        approvals = signatures.length / 65;
        uint256 required = quorum(size);
        if (approvals < required) revert QuorumNotReached(approvals, required);

        bytes32 digest = _approvalDigest(approval);
        uint256 cursor = 0;
        for (uint256 j = 0; j < approvals; ++j) {
            address signer = _recover(digest, signatures, j);
            // Signatures are sorted by signer, so one forward pass over the sorted committee
            // both checks membership and rules out a miner signing twice.
            while (cursor < size && miners[cursor] != signer) ++cursor;
            if (cursor == size) _revertUnmatchedSigner(miners, signer, j);
            ++cursor;
            if (signer != owner && !_registered[signer]) revert SignerNotEligible(signer);
        }
    }

    /// @dev Revert for the signer of signature `index`, which the forward pass did not find
    /// after the previous signer: with {SignaturesNotSorted} if it is a committee member
    /// (it comes at or before the previous signer: out of order, or signing twice), with
    /// {SignerNotInCommittee} otherwise. Runs only on the failure path.
    function _revertUnmatchedSigner(address[] calldata miners, address signer, uint256 index)
        private
        pure
    {
        for (uint256 i = 0; i < miners.length; ++i) {
            if (miners[i] == signer) revert SignaturesNotSorted(index, signer);
        }
        revert SignerNotInCommittee(signer);
    }

    /// @dev Recover the signer of the `index`-th 65-byte signature in `signatures`,
    /// rejecting malleable (high-s) signatures, `v` other than 27/28, and failed recovery.
    function _recover(bytes32 digest, bytes calldata signatures, uint256 index)
        private
        pure
        returns (address signer)
    {
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            let offset := add(signatures.offset, mul(index, 65))
            r := calldataload(offset)
            s := calldataload(add(offset, 32))
            v := byte(0, calldataload(add(offset, 64)))
        }
        if (uint256(s) > _HALF_CURVE_ORDER || (v != 27 && v != 28)) revert InvalidSignature(index);
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature(index);
    }

    /// @dev EIP-712 digest of `approval` under this contract's domain.
    function _approvalDigest(RoundApproval calldata approval) private view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(
                ROUND_APPROVAL_TYPEHASH,
                approval.round,
                approval.modelHash,
                approval.previousHash,
                approval.acceptedRoot,
                approval.committeeRoot,
                approval.timestamp
            )
        );
        return keccak256(abi.encodePacked(hex"1901", _domainSeparator(), structHash));
    }

    /// @dev The cached domain separator, rebuilt if the chain id changed (a fork).
    function _domainSeparator() private view returns (bytes32) {
        if (block.chainid == _cachedChainId) return _cachedDomainSeparator;
        return _buildDomainSeparator();
    }

    /// @dev keccak256 of the EIP-712 domain (name, version, chain id, this contract).
    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, _VERSION_HASH, block.chainid, address(this))
        );
    }
}
