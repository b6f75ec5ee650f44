"""The wire form of domain errors: :class:`ToolRunnerError` -> the kit's ``ServiceError``."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import grpc

from foredeck_kit.errors import ServiceError
from foredeck_toolrunner.domain.errors import ToolRunnerError

__all__ = ["DOMAIN", "maps_errors", "to_service_error"]

DOMAIN = "toolrunner.foredeck.dev"

P = ParamSpec("P")
R = TypeVar("R")


def to_service_error(error: ToolRunnerError) -> ServiceError:
    """The ServiceError carrying a domain error's code, reason and details."""
    return ServiceError(
        grpc.StatusCode[error.code],
        error.reason,
        error.message,
        metadata=error.metadata,
        field_violations=error.field_violations,
        retry_after=error.retry_after,
        quota_violations=error.quota_violations,
    )


def maps_errors(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate a servicer method so domain errors reach the kit's error mapping typed."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except ToolRunnerError as error:
            raise to_service_error(error) from None

    return wrapper
