"""Foredeck's Python SDK: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both find the gateway and a credential by themselves (arguments, then ``FOREDECK_ADDRESS`` /
``FOREDECK_API_KEY``, then the local stack started by ``foredeck up``) and raise the typed
errors of :mod:`foredeck_client.errors`.
"""

from foredeck_client.aio import AsyncClient, Page
from foredeck_client.connection import Connection, resolve_connection
from foredeck_client.errors import ForedeckError
from foredeck_client.sync import Client

__all__ = ["AsyncClient", "Client", "Connection", "ForedeckError", "Page", "resolve_connection"]
