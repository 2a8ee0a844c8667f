"""Storage retry policy: what is transient is decided from exception types and errno, never message text."""

from __future__ import annotations

import errno

import pytest

from pipeline import storage


def _s3fs_translated(code: str) -> OSError:
    """What s3fs raises for an S3 error response (its own translation table), with the botocore cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject"))


@pytest.mark.parametrize(
    "make, transient",
    [
        (lambda: ConnectionResetError("reset"), True),
        (lambda: TimeoutError(), True),
        (
            lambda: __import__("botocore.exceptions").exceptions.EndpointConnectionError(
                endpoint_url="http://x"
            ),
            True,
        ),
        (
            lambda: __import__("botocore.exceptions").exceptions.ReadTimeoutError(endpoint_url="http://x"),
            True,
        ),
        (lambda: _s3fs_translated("SlowDown"), True),  # EBUSY
        (lambda: _s3fs_translated("InternalError"), True),  # EREMOTEIO
        (lambda: _s3fs_translated("NoSuchKey"), False),  # FileNotFoundError
        (lambda: _s3fs_translated("AccessDenied"), False),  # PermissionError
        (lambda: OSError(errno.ENOSPC, "No space left on device"), False),  # the environment, not retryable
        (lambda: FileNotFoundError("gone"), False),
        (lambda: ValueError("bad input: connection timeout 503"), False),  # text alone decides nothing
        (lambda: RuntimeError("HTTP 503 SlowDown, connection reset"), False),
    ],
)
def test_is_transient_by_type(make, transient):
    assert storage.is_transient(make()) is transient


def test_is_transient_follows_the_cause_chain():
    try:
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert storage.is_transient(wrapped)


def test_retry_retries_transient_and_raises_the_rest_at_once():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert storage.retry(flaky, cfg=storage.StorageConfig(backoff_s=0.0)) == "ok" and len(calls) == 3
    calls.clear()

    def full():
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        storage.retry(full, cfg=storage.StorageConfig(backoff_s=0.0))
    assert len(calls) == 1
    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        storage.retry(down, cfg=storage.StorageConfig(retries=2, backoff_s=0.0))
    assert len(calls) == 3
