"""Classifying the official SDKs' exceptions into the router's failure kinds.

Only the HTTP status, the retry headers and the error's type/code are read; the provider's
message text is dropped here so it can never reach a caller.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

import anthropic
import httpx2
import openai

from foredeck_llmrouter.domain.errors import (
    Failure,
    ProviderFailure,
    classify_error_type,
    classify_status,
)

_TRANSPORT_ERRORS = (httpx2.TransportError, httpx2.StreamError)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a provider asked for: ``retry-after-ms``, else ``Retry-After`` (seconds or date)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def should_retry_header(headers: Mapping[str, str]) -> bool | None:
    """The provider's ``x-should-retry`` verdict, when it sent one."""
    value = headers.get("x-should-retry")
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def _body_error(body: object) -> tuple[str, str]:
    """(type, code) from an error body in either provider's format."""
    if not isinstance(body, Mapping):
        return "", ""
    inner = body.get("error", body)
    if not isinstance(inner, Mapping):
        return "", ""
    return str(inner.get("type") or ""), str(inner.get("code") or "")


def failure_from_exception(error: BaseException) -> ProviderFailure:
    """Classify an exception raised by the anthropic or openai SDK (or their transport)."""
    if isinstance(error, ProviderFailure):
        return error
    if isinstance(error, anthropic.APITimeoutError | openai.APITimeoutError):
        return ProviderFailure(Failure.TIMEOUT)
    if isinstance(error, anthropic.APIConnectionError | openai.APIConnectionError):
        return ProviderFailure(Failure.UNAVAILABLE)
    if isinstance(error, anthropic.APIStatusError | openai.APIStatusError):
        error_type, code = _body_error(error.body)
        if isinstance(error, openai.APIStatusError):
            error_type = error.type or error_type
            code = error.code or code
        headers = error.response.headers
        status = error.status_code
        if status < 400:
            # An error event inside a stream: the HTTP status is the stream's 200.
            kind = classify_error_type(error_type)
            return ProviderFailure(
                kind,
                upstream_status=0,
                retry_after=retry_after_seconds(headers),
                upstream_error_type=error_type,
            )
        return ProviderFailure(
            classify_status(status, error_type, code),
            upstream_status=status,
            retry_after=retry_after_seconds(headers),
            should_retry=should_retry_header(headers),
            upstream_error_type=code or error_type,
        )
    if isinstance(error, openai.APIError):
        # openai raises a bare APIError for an error object inside a stream.
        error_type, code = error.type or "", error.code or ""
        kind = (
            Failure.QUOTA_EXHAUSTED
            if code == "insufficient_quota"
            else classify_error_type(error_type or code)
        )
        return ProviderFailure(kind, upstream_error_type=code or error_type)
    if isinstance(error, anthropic.APIError):
        return ProviderFailure(Failure.RESPONSE_INVALID)
    if isinstance(error, _TRANSPORT_ERRORS):
        return ProviderFailure(Failure.UNAVAILABLE)
    if isinstance(error, ValueError):
        # A body the SDK could not parse into its types.
        return ProviderFailure(Failure.RESPONSE_INVALID)
    raise error


CLASSIFIED = (
    anthropic.APIError,
    openai.APIError,
    httpx2.TransportError,
    httpx2.StreamError,
    ValueError,
)
"""Exceptions `failure_from_exception` turns into failures; anything else is a defect."""
