"""First start of a local gateway: an admin key and a developer key, written to a 0600 file.

The secrets go only to ``<data_dir>/credentials.json``; the log says where the file is, never
what is in it. On later starts the file's keys are written to Redis again if Redis lost them
(same ids, same hashes), so the file stays valid.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from foredeck_gateway.credentials import hash_secret, new_api_key_secret
from foredeck_gateway.store import KeyRecord, RedisState

__all__ = ["CREDENTIALS_FILE", "DEVELOPER_PERMISSIONS", "ensure_credentials"]

CREDENTIALS_FILE = "credentials.json"
# What a developer's runs need as well as the runs themselves: runs act downstream with the
# submitter's permissions (the model, memory, and every tool by name).
DEVELOPER_PERMISSIONS = (
    "agents:read",
    "agents:write",
    "runs:create",
    "runs:read",
    "runs:cancel",
    "approvals:resolve",
    "llm:generate",
    "llm:embed",
    "llm:read",
    "memory:read",
    "memory:write",
    "toolregistry:read",
    "tools:*",
)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _record(entry: dict[str, Any], now_ms: int) -> KeyRecord:
    return KeyRecord(
        api_key_id=entry["api_key_id"],
        prefix=entry["secret"][:12],
        display_name=entry["display_name"],
        tenant_id=entry["tenant_id"],
        user_id=entry["user_id"],
        kind=entry["kind"],
        permissions=list(entry["permissions"]),
        create_ms=now_ms,
        created_by="bootstrap",
    )


async def ensure_credentials(
    state: RedisState, data_dir: Path, *, tenant: str, user: str, admin_tenant: str
) -> Path:
    """Create the credentials file and its keys on first start; return the file's path."""
    path = data_dir / CREDENTIALS_FILE
    now_ms = int(time.time() * 1000)
    if path.exists():
        document = json.loads(path.read_text())
    else:
        document = {
            "admin": {
                "api_key_id": "key_bootstrap_admin",
                "secret": new_api_key_secret(),
                "display_name": "bootstrap admin",
                "tenant_id": admin_tenant,
                "user_id": "admin",
                "kind": "admin",
                "permissions": ["*"],
            },
            "developer": {
                "api_key_id": "key_bootstrap_developer",
                "secret": new_api_key_secret(),
                "display_name": "local developer",
                "tenant_id": tenant,
                "user_id": user,
                "kind": "user",
                "permissions": list(DEVELOPER_PERMISSIONS),
            },
        }
        _write_private(path, json.dumps(document, indent=2) + "\n")
    for entry in document.values():
        if await state.get_key(entry["api_key_id"]) is None:
            await state.create_key(_record(entry, now_ms), hash_secret(entry["secret"]))
    return path
