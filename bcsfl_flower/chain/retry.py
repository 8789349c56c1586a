"""Retries for the chain: transient failures are retried with backoff, reverts are not.

A transaction or read that fails to reach the chain (connection refused, timeout, RPC
error) is retried with exponential backoff (:class:`RetryPolicy`). If the chain stays
down, :class:`~bcsfl_flower.chain.errors.ChainUnavailableError` is raised with what is
pending, and the run must stop: a round is never skipped silently. A contract revert
is not retried (it would revert again) and raises
:class:`~bcsfl_flower.chain.errors.ChainRejectedError` naming the custom error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, TypeVar, cast

from flwr.common.logger import log
from web3.exceptions import ContractLogicError, ProviderConnectionError, TimeExhausted, Web3RPCError
from web3.types import TxReceipt

from bcsfl_flower.chain.errors import ChainRejectedError, ChainUnavailableError, rejected_error

_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes requests' ConnectionError and Timeout
    TimeExhausted,
    ProviderConnectionError,
    Web3RPCError,
)


def _rejection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ContractLogicError]
    try:
        from eth_tester.exceptions import TransactionFailed
    except ImportError:  # pragma: no cover - eth-tester is a dependency
        pass
    else:
        errors.append(TransactionFailed)
    return tuple(errors)


REJECTION_ERRORS = _rejection_errors()
"""Errors by which a backend reports a revert: never retried."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transactions that do not reach the chain.

    Attempt ``k`` (from 1) that fails is followed by a pause of
    ``min(base_delay_s * 2**(k-1), max_delay_s)`` seconds, for ``attempts`` attempts.
    """

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("base_delay_s and max_delay_s must be >= 0")

    def delay(self, attempt: int) -> float:
        """Return the pause after failed attempt ``attempt`` (1-based)."""
        return cast(float, min(self.base_delay_s * 2 ** (attempt - 1), self.max_delay_s))


def send_with_retries(
    action: str,
    attempt: Callable[[], TxReceipt],
    retry: RetryPolicy,
    sleep: Callable[[float], None],
    *,
    resume: Mapping[str, Any],
    abi: Sequence[Mapping[str, Any]],
    already_done: Callable[[], TxReceipt | None] | None = None,
) -> TxReceipt:
    """Send a transaction with :func:`retry_transient`, never twice once one has landed."""

    def once(number: int) -> TxReceipt:
        try:
            if number > 1 and already_done is not None:
                landed = already_done()
                if landed is not None:
                    log(
                        INFO,
                        "%s: an earlier attempt landed (tx %s)",
                        action,
                        landed["transactionHash"].to_0x_hex(),
                    )
                    return landed
            receipt = attempt()
        except REJECTION_ERRORS as err:
            raise rejected_error(abi, action, err) from err
        if int(receipt["status"]) != 1:
            raise ChainRejectedError(
                f"{action}: transaction {receipt['transactionHash'].to_0x_hex()} reverted",
                error_name=None,
                arguments={},
            )
        return receipt

    return retry_transient(
        action,
        once,
        retry,
        sleep,
        resume=resume,
        hint=" Restart once the chain is back: the pending statement is in .resume",
    )


def retry_transient(
    action: str,
    call: Callable[[int], _T],
    retry: RetryPolicy,
    sleep: Callable[[float], None],
    *,
    resume: Mapping[str, Any],
    hint: str = "",
) -> _T:
    """Return ``call(attempt_number)``, retrying transient chain errors with backoff.

    Raises
    ------
    ChainUnavailableError
        If every attempt failed with a transient error: the run stops rather than skip
        a round.
    """
    last_error: BaseException | None = None
    for number in range(1, retry.attempts + 1):
        try:
            return call(number)
        except _TRANSIENT_ERRORS as err:
            last_error = err
            if number < retry.attempts:
                delay = retry.delay(number)
                log(
                    WARNING,
                    "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                    action,
                    number,
                    retry.attempts,
                    err,
                    delay,
                )
                sleep(delay)
    raise ChainUnavailableError(
        f"{action}: the chain did not answer after {retry.attempts} attempts "
        f"(last error: {last_error}); the run stops here so that no round is skipped.{hint}",
        action=action,
        attempts=retry.attempts,
        resume=resume,
    )
