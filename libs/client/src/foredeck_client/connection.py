"""Where the gateway is and which credential to present, found without configuration when possible.

In order, the first that answers wins, for the address and the key separately:

1. what the caller passes (``Client(address=..., api_key=...)``);
2. the environment: ``FOREDECK_ADDRESS`` (``host:port``; ``https://host:port`` or
   ``grpcs://host:port`` for TLS) and ``FOREDECK_API_KEY``;
3. the local stack started by ``foredeck up``: its data directory (``FOREDECK_DATA_DIR``, else
   the nearest ``.foredeck`` directory in the working directory or a parent) holds
   ``stack.json`` with the gateway's address and ``services/gateway/credentials.json`` with the
   developer and admin keys the gateway created on its first start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foredeck_client.errors import ConfigurationError

__all__ = ["Connection", "find_data_dir", "resolve_connection"]

ADDRESS_VARIABLE = "FOREDECK_ADDRESS"
API_KEY_VARIABLE = "FOREDECK_API_KEY"
DATA_DIR_VARIABLE = "FOREDECK_DATA_DIR"
DATA_DIR_NAME = ".foredeck"
STACK_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
_TLS_SCHEMES = ("https://", "grpcs://")
_PLAIN_SCHEMES = ("http://", "grpc://")


@dataclass(frozen=True, slots=True)
class Connection:
    """A gateway address, whether to use TLS, and the credential to present."""

    address: str
    api_key: str
    tls: bool = False

    def __repr__(self) -> str:  # never print the key
        return f"Connection(address={self.address!r}, tls={self.tls}, api_key=***)"


def find_data_dir(start: Path | None = None) -> Path | None:
    """The local stack's data directory: ``FOREDECK_DATA_DIR``, else the nearest ``.foredeck``."""
    configured = os.environ.get(DATA_DIR_VARIABLE)
    if configured:
        return Path(configured)
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / DATA_DIR_NAME
        if (candidate / STACK_FILE).is_file():
            return candidate
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stack_address(data_dir: Path) -> str:
    stack = _read_json(data_dir / STACK_FILE) or {}
    gateway = stack.get("components", {}).get("gateway", {})
    address = gateway.get("address", "") if isinstance(gateway, dict) else ""
    return address if isinstance(address, str) else ""


def _stack_key(data_dir: Path, role: str) -> str:
    for path in (data_dir / "services" / "gateway" / CREDENTIALS_FILE, data_dir / CREDENTIALS_FILE):
        entry = (_read_json(path) or {}).get(role, {})
        key = entry.get("secret", "") if isinstance(entry, dict) else ""
        if isinstance(key, str) and key:
            return key
    return ""


def resolve_connection(
    address: str | None = None,
    api_key: str | None = None,
    *,
    data_dir: Path | None = None,
    role: str = "developer",
) -> Connection:
    """Find the gateway and the credential; :class:`ConfigurationError` says what is missing.

    ``role`` picks the local stack's credential: ``developer`` (runs and agents) or ``admin``
    (API keys and budgets).
    """
    address = address or os.environ.get(ADDRESS_VARIABLE, "")
    api_key = api_key or os.environ.get(API_KEY_VARIABLE, "")
    stack_dir = data_dir or find_data_dir()
    if stack_dir is not None:
        address = address or _stack_address(stack_dir)
        api_key = api_key or _stack_key(stack_dir, role)
    if not address:
        where = f" ({stack_dir / STACK_FILE} names no gateway)" if stack_dir else ""
        raise ConfigurationError(
            f"no Foredeck gateway address: set {ADDRESS_VARIABLE} or run `foredeck up`{where}"
        )
    if not api_key:
        raise ConfigurationError(
            f"no API key: set {API_KEY_VARIABLE} or run `foredeck up`, whose gateway creates one "
            f"in {DATA_DIR_NAME}/services/gateway/{CREDENTIALS_FILE}"
        )
    tls = address.startswith(_TLS_SCHEMES)
    for scheme in (*_TLS_SCHEMES, *_PLAIN_SCHEMES):
        if address.startswith(scheme):
            address = address[len(scheme) :]
            break
    return Connection(address=address.rstrip("/"), api_key=api_key, tls=tls)
