// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";

/// @title BCSFLAudit
/// @author bcsfl-flower
/// @notice On-chain audit trail of a BCS-FL federation. Every committed round anchors the
/// hash of its global model, linked to the previously anchored hash, and only with a quorum
/// certificate: at least ceil(2N/3) EIP-712 `RoundApproval` signatures from the round's N
/// miners. Rounds that roll back are recorded too, with a certificate of the same kind, so
/// the sequence of rounds has no gaps and every entry is attested by the round's miners.
/// Every signed struct carries the run's identity ({runId}), derived at deployment from the
/// chain, this contract's address, the genesis model and the operator's fresh salt: two runs
/// that deploy at the same address on the same chain (the embedded chain always does) still
/// accept nothing signed in the other.
/// @dev Gas per anchored round is flat in the number of registered clients and small. The
/// contract keeps one slot, its rolling head: the last recorded round and a 192-bit digest
/// of the last anchored model hash, updated in place (non-zero from deployment, so the first
/// round costs what every later one does). Every per-round field is emitted in
/// {RoundAnchored}; the committee and the signatures are in the transaction's input. Logs
/// and inputs are committed by the block's receipts and transactions roots as firmly as
/// storage is by the state root, at a fraction of the cost, so the paper's reads
/// (`getLatestModel`, `getBlockchain`) are served from the events off chain and checked
/// against the head with {isLatestModel}. Every signer of a certificate must be a registered
/// client (one cold storage read per signer, about 8.4k gas for a quorum of 4). Whether the
/// committee is the stake-weighted draw the protocol promises is checked off chain, from
/// the round's state statement, whose hash every approval signs (`stateRoot`): the draw
/// needs the whole stake table, which no affordable transaction could read. Signature recovery and EIP-712 hashing come from OpenZeppelin Contracts. The
/// operator is an immutable set at deployment rather than OpenZeppelin's `Ownable`: an
/// audit trail whose operator could change hands mid-run is weaker evidence, and
/// `Ownable`'s storage read adds 2.1k gas to every anchor (measured: 61,396 gas per round
/// with `Ownable`, 59,250 without, over a 60k budget).
contract BCSFLAudit is EIP712 {
    // ------------------------------------------------------------------------------------
    // Types
    // ------------------------------------------------------------------------------------

    /// @notice The statement a miner signs to approve a round (EIP-712 struct `RoundApproval`,
    /// whose first member, `bytes32 run`, is not passed in: the contract hashes its own
    /// {runId} there, so a certificate signed in another run recovers to other addresses).
    /// @param round The federated round being anchored (the genesis model is round 0).
    /// @param modelHash Canonical SHA-256 hash of the committed global model.
    /// @param previousHash Model hash of the last anchored round (the hash-chain link).
    /// @param acceptedRoot Commitment to the client packets accepted into this round; each
    /// packet names the hash of the client's update, which the model store keeps.
    /// @param committeeRoot keccak256 of the committee: the miners' addresses, ascending,
    /// each left-padded to 32 bytes (`abi.encodePacked(address[])`).
    /// @param stateRoot Hash of the round's state statement, kept in the model store: the
    /// stake table the committee was drawn from, the decision settings, the accepted
    /// replies and the committee draw, from which anyone can recompute the draw and replay
    /// the round.
    /// @param timestamp Unix time (seconds) at which the candidate package was built.
    struct RoundApproval {
        uint64 round;
        bytes32 modelHash;
        bytes32 previousHash;
        bytes32 acceptedRoot;
        bytes32 committeeRoot;
        bytes32 stateRoot;
        uint64 timestamp;
    }

    /// @notice The statement a miner signs to record that a round rolled back (EIP-712
    /// struct `RoundRollback`, whose first member `bytes32 run` is {runId}, as above).
    /// @param round The round that rolled back.
    /// @param keptModelHash The model the federation keeps: the last anchored one.
    /// @param committeeRoot keccak256 of the signing committee, as in {RoundApproval}.
    /// @param stateRoot Hash of the round's state statement: why nothing committed.
    /// @param reasonHash keccak256 of the reason text {recordRollback} emits: the reason is
    /// signed, and anyone can recompute it from the statement.
    struct RoundRollback {
        uint64 round;
        bytes32 keptModelHash;
        bytes32 committeeRoot;
        bytes32 stateRoot;
        bytes32 reasonHash;
    }

    /// @dev The rolling head, one storage slot. `modelDigest` is the first 24 bytes of
    /// keccak256(last anchored model hash): finding another model hash with the same digest
    /// is a 2^192 second-preimage search, and the full hash is in the round's event.
    struct Head {
        uint64 lastRound;
        bytes24 modelDigest;
    }

    // ------------------------------------------------------------------------------------
    // Constants and immutables
    // ------------------------------------------------------------------------------------

    /// @notice EIP-712 type hash of {RoundApproval}.
    bytes32 public constant ROUND_APPROVAL_TYPEHASH = keccak256(
        "RoundApproval(bytes32 run,uint64 round,bytes32 modelHash,bytes32 previousHash,"
        "bytes32 acceptedRoot,bytes32 committeeRoot,bytes32 stateRoot,uint64 timestamp)"
    );

    /// @notice EIP-712 type hash of {RoundRollback}.
    bytes32 public constant ROUND_ROLLBACK_TYPEHASH = keccak256(
        "RoundRollback(bytes32 run,uint64 round,bytes32 keptModelHash,bytes32 committeeRoot,"
        "bytes32 stateRoot,bytes32 reasonHash)"
    );

    /// @notice Largest committee accepted by {anchorRound}; bounds the work of one anchor.
    uint256 public constant MAX_COMMITTEE_SIZE = 64;

    /// @notice The operator: the only account that registers clients, anchors rounds and
    /// records rollbacks.
    address public immutable owner;

    /// @notice Hash of the initial global model (round 0), which round 1 links to.
    bytes32 public immutable genesisModelHash;

    /// @notice The block the trail was deployed in: where a reader starts scanning events.
    uint256 public immutable deploymentBlock;

    /// @notice The run's identity, the first member of every signed struct:
    /// keccak256(abi.encode(chainid, this contract, genesis hash, the operator's salt)).
    bytes32 public immutable runId;

    /// @notice Whether the operator may certify a round alone (a committee of just the
    /// owner), for federations whose clients cannot sign. Fixed at deployment, so an
    /// auditor reads once whether the miners' certificates are the clients' word. The
    /// operator may always certify a rollback alone: a round that drew no committee (no
    /// valid reply) has nobody else to, and a rollback anchors no model.
    bool public immutable operatorCertifies;

    // ------------------------------------------------------------------------------------
    // Storage
    // ------------------------------------------------------------------------------------

    Head private _head;
    uint256 private _clientCount;
    mapping(address client => bool registered) private _registered;

    // ------------------------------------------------------------------------------------
    // Events
    // ------------------------------------------------------------------------------------

    /// @notice Emitted once, at deployment, with the hash of the initial global model.
    /// @param modelHash The genesis model hash (round 0).
    /// @param runId The run's identity (see {runId}).
    /// @param operatorCertifies Whether the operator may certify rounds alone.
    event GenesisAnchored(bytes32 indexed modelHash, bytes32 runId, bool operatorCertifies);

    /// @notice Emitted when a client is registered.
    /// @param client The client's address.
    /// @param stake The client's initial stake, in the federation's own units.
    event ClientRegistered(address indexed client, uint96 stake);

    /// @notice Emitted when a round is anchored with a valid quorum certificate.
    /// @param round The anchored round.
    /// @param modelHash The round's global model hash.
    /// @param previousHash The hash it links to (the last anchored model hash).
    /// @param acceptedRoot Commitment to the accepted client packets.
    /// @param committeeRoot Commitment to the round's miners.
    /// @param stateRoot Hash of the round's state statement.
    /// @param timestamp The candidate package's timestamp, as signed by the miners.
    /// The committee and the certificate's signatures are in the transaction's input.
    event RoundAnchored(
        uint64 indexed round,
        bytes32 indexed modelHash,
        bytes32 previousHash,
        bytes32 acceptedRoot,
        bytes32 committeeRoot,
        bytes32 stateRoot,
        uint64 timestamp
    );

    /// @notice Emitted when a round commits no new model and the federation keeps the last
    /// one, with a certificate over {RoundRollback}.
    /// @param round The round that rolled back.
    /// @param keptModelHash The model hash the federation keeps (the last anchored one).
    /// @param committeeRoot Commitment to the signing committee.
    /// @param stateRoot Hash of the round's state statement (a rolled-back round draws a committee too).
    /// @param reason Why, e.g. "rollback: no candidate reached quorum ...": signed (its hash
    /// is the rollback's `reasonHash`) and recomputable from the round's statement.
    event RoundRolledBack(
        uint64 indexed round,
        bytes32 indexed keptModelHash,
        bytes32 committeeRoot,
        bytes32 stateRoot,
        string reason
    );

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
    /// @notice The previous hash is not the last anchored model hash (whose digest is given).
    error BrokenHashLink(bytes24 expectedDigest, bytes32 got);
    /// @notice The zero hash cannot be a model hash.
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
    /// @notice A signature is malformed: `s` in the upper half, or unrecoverable.
    error InvalidSignature(uint256 index);
    /// @notice A signature recovers to an address that is not in the committee.
    error SignerNotInCommittee(address signer);
    /// @notice A signature recovers to an address that is not a registered client (a
    /// signature made in another run recovers to an unrelated address, hence this error).
    error SignerNotRegistered(address signer);
    /// @notice The operator signed a round's approval, and this trail was deployed without
    /// {operatorCertifies}.
    error OperatorCannotCertify();
    /// @notice The reason text does not hash to the signed `reasonHash`.
    error ReasonMismatch(bytes32 expected, bytes32 got);
    /// @notice Signatures must be sorted by signer, strictly ascending (hence one per miner):
    /// the signer of signature `index` is a committee member at or before the previous one.
    error SignaturesNotSorted(uint256 index, address signer);

    // ------------------------------------------------------------------------------------
    // Construction and access control
    // ------------------------------------------------------------------------------------

    /// @notice Deploy the trail, owned by the deployer, starting from the initial model.
    /// @param genesisHash Canonical hash of the initial global model (round 0); the first
    /// anchored round must link to it.
    /// @param salt A fresh random value from the operator, so that two runs from the same
    /// genesis at the same address and chain still have distinct identities.
    /// @param operatorMayCertify Sets {operatorCertifies}.
    constructor(bytes32 genesisHash, bytes32 salt, bool operatorMayCertify)
        EIP712("BCSFLAudit", "1")
    {
        if (genesisHash == bytes32(0)) revert ZeroModelHash();
        bytes32 run = keccak256(abi.encode(block.chainid, address(this), genesisHash, salt));
        owner = msg.sender;
        genesisModelHash = genesisHash;
        deploymentBlock = block.number;
        runId = run;
        operatorCertifies = operatorMayCertify;
        _head = Head(0, _digest(genesisHash));
        emit GenesisAnchored(genesisHash, run, operatorMayCertify);
    }

    /// @dev Reverts with {NotOwner} unless the caller is the owner.
    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    // ------------------------------------------------------------------------------------
    // Registration
    // ------------------------------------------------------------------------------------

    /// @notice Register a client with its initial stake.
    /// @param client The client's signing address.
    /// @param stake The client's initial stake, emitted in {ClientRegistered}.
    function registerClient(address client, uint96 stake) external onlyOwner {
        _register(client, stake);
    }

    /// @notice Register several clients in one transaction.
    /// @param clients The clients' signing addresses.
    /// @param stakes Their initial stakes, in the same order.
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
    /// is the last anchored model hash (its digest is the head's); the certificate (see
    /// {_verifyCertificate}). Effects (the new head) follow, then the event; there are no
    /// external calls.
    /// @param approval The approved statement; the same struct every miner signed.
    /// @param miners The round's whole committee, strictly ascending.
    /// @param signatures Concatenated 65-byte signatures (r, s, v), sorted by signer address.
    function anchorRound(
        RoundApproval calldata approval,
        address[] calldata miners,
        bytes calldata signatures
    ) external onlyOwner {
        Head memory head = _head;
        uint64 round = approval.round;
        if (round != head.lastRound + 1) revert UnexpectedRound(head.lastRound + 1, round);
        if (_digest(approval.previousHash) != head.modelDigest) {
            revert BrokenHashLink(head.modelDigest, approval.previousHash);
        }
        if (approval.modelHash == bytes32(0)) revert ZeroModelHash();

        _verifyCertificate(
            _approvalDigest(approval), approval.committeeRoot, miners, signatures, operatorCertifies
        );

        _head = Head(round, _digest(approval.modelHash));
        emit RoundAnchored(
            round,
            approval.modelHash,
            approval.previousHash,
            approval.acceptedRoot,
            approval.committeeRoot,
            approval.stateRoot,
            approval.timestamp
        );
    }

    /// @notice Record that a round rolled back (it commits no new model), with its miners'
    /// certificate over a {RoundRollback}.
    /// @dev The same checks as {anchorRound}, except that the operator alone may certify
    /// (a committee of just the owner): a round with no valid reply draws no committee,
    /// and a rollback changes no anchored hash, so the operator's word can only delay the
    /// federation, which it can do anyway by not anchoring. The statement says which.
    /// @param rollback The signed rollback.
    /// @param miners The signing committee, strictly ascending.
    /// @param signatures Concatenated 65-byte signatures, sorted by signer address.
    /// @param reason The reason the miners signed (its keccak256 is `rollback.reasonHash`).
    function recordRollback(
        RoundRollback calldata rollback,
        address[] calldata miners,
        bytes calldata signatures,
        string calldata reason
    ) external onlyOwner {
        Head memory head = _head;
        uint64 round = rollback.round;
        if (round != head.lastRound + 1) revert UnexpectedRound(head.lastRound + 1, round);
        if (_digest(rollback.keptModelHash) != head.modelDigest) {
            revert BrokenHashLink(head.modelDigest, rollback.keptModelHash);
        }
        bytes32 reasonHash = keccak256(bytes(reason));
        if (reasonHash != rollback.reasonHash) revert ReasonMismatch(rollback.reasonHash, reasonHash);

        _verifyCertificate(
            _rollbackDigest(rollback), rollback.committeeRoot, miners, signatures, true
        );

        _head.lastRound = round;
        emit RoundRolledBack(
            round, rollback.keptModelHash, rollback.committeeRoot, rollback.stateRoot, reason
        );
    }

    // ------------------------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------------------------

    /// @notice Whether `modelHash` is the last anchored model (the genesis before any).
    /// @dev The paper's `getLatestModel` is served from the last {RoundAnchored} event;
    /// this view lets a reader check that event against the head.
    /// @param modelHash A model hash.
    /// @return True if its digest is the head's.
    function isLatestModel(bytes32 modelHash) external view returns (bool) {
        return _digest(modelHash) == _head.modelDigest;
    }

    /// @notice The last recorded round, anchored or rolled back.
    /// @return The round number (0 before the first round).
    function latestRound() external view returns (uint64) {
        return _head.lastRound;
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
        return _domainSeparatorV4();
    }

    /// @notice The EIP-712 digest a miner signs for `approval`.
    /// @param approval The statement.
    /// @return The digest `keccak256("\x19\x01" || domainSeparator || structHash)`.
    function approvalDigest(RoundApproval calldata approval) external view returns (bytes32) {
        return _approvalDigest(approval);
    }

    /// @notice The EIP-712 digest a miner signs for `rollback`.
    /// @param rollback The rollback.
    /// @return The digest.
    function rollbackDigest(RoundRollback calldata rollback) external view returns (bytes32) {
        return _rollbackDigest(rollback);
    }

    /// @notice The minimum number of approvals for a committee of `committeeSize` miners.
    /// @param committeeSize N.
    /// @return ceil(2N/3).
    function quorum(uint256 committeeSize) public pure returns (uint256) {
        return (2 * committeeSize + 2) / 3;
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

    /// @dev Verify a certificate over `digest`; reverts with the first problem found: the
    /// committee is valid and matches its signed root; at least ceil(2N/3) signatures,
    /// sorted by signer address, each a canonical (low-s) signature of `digest` by a
    /// distinct committee member that is a registered client, or by the owner where
    /// `ownerMaySign`.
    function _verifyCertificate(
        bytes32 digest,
        bytes32 committeeRoot,
        address[] calldata miners,
        bytes calldata signatures,
        bool ownerMaySign
    ) private view {
        uint256 size = miners.length;
        if (size == 0 || size > MAX_COMMITTEE_SIZE) revert InvalidCommitteeSize(size);
        if (miners[0] == address(0)) revert CommitteeNotSorted(0);
        for (uint256 i = 1; i < size; ++i) {
            if (miners[i - 1] >= miners[i]) revert CommitteeNotSorted(i);
        }
        bytes32 root = keccak256(abi.encodePacked(miners));
        if (root != committeeRoot) revert CommitteeRootMismatch(root, committeeRoot);

        if (signatures.length % 65 != 0) revert MalformedSignatures(signatures.length);
        uint256 approvals = signatures.length / 65;
        uint256 required = quorum(size);
        if (approvals < required) revert QuorumNotReached(approvals, required);

        uint256 cursor = 0;
        for (uint256 j = 0; j < approvals; ++j) {
            address signer = _recover(digest, signatures, j);
            // Signatures are sorted by signer, so one forward pass over the sorted committee
            // both checks membership and rules out a miner signing twice.
            while (cursor < size && miners[cursor] != signer) ++cursor;
            if (cursor == size) _revertUnmatchedSigner(miners, signer, j);
            ++cursor;
            if (signer == owner) {
                if (!ownerMaySign) revert OperatorCannotCertify();
            } else if (!_registered[signer]) {
                revert SignerNotRegistered(signer);
            }
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

    /// @dev Recover the signer of the `index`-th 65-byte signature in `signatures` with
    /// OpenZeppelin's ECDSA, which rejects malleable (high-s) signatures and failed
    /// recovery (including a `v` other than 27/28).
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
        ECDSA.RecoverError failure;
        (signer, failure,) = ECDSA.tryRecover(digest, v, r, s);
        if (failure != ECDSA.RecoverError.NoError) revert InvalidSignature(index);
    }

    /// @dev The head's 192-bit digest of a model hash.
    function _digest(bytes32 modelHash) private pure returns (bytes24) {
        return bytes24(keccak256(abi.encode(modelHash)));
    }

    /// @dev EIP-712 digest of `approval` under this contract's domain.
    function _approvalDigest(RoundApproval calldata approval) private view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    ROUND_APPROVAL_TYPEHASH,
                    runId,
                    approval.round,
                    approval.modelHash,
                    approval.previousHash,
                    approval.acceptedRoot,
                    approval.committeeRoot,
                    approval.stateRoot,
                    approval.timestamp
                )
            )
        );
    }

    /// @dev EIP-712 digest of `rollback` under this contract's domain.
    function _rollbackDigest(RoundRollback calldata rollback) private view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    ROUND_ROLLBACK_TYPEHASH,
                    runId,
                    rollback.round,
                    rollback.keptModelHash,
                    rollback.committeeRoot,
                    rollback.stateRoot,
                    rollback.reasonHash
                )
            )
        );
    }
}
