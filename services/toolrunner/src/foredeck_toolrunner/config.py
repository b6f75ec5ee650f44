"""Settings of the toolrunner service, read once in ``main()`` from ``FOREDECK_TOOLRUNNER_*``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from foredeck_kit.settings import ServiceSettings

__all__ = ["ToolRunnerSettings"]

MIB = 1024 * 1024


class ToolRunnerSettings(ServiceSettings):
    """Registry store, ledger, sandbox defaults and ceilings of the tool runner."""

    model_config = SettingsConfigDict(env_prefix="FOREDECK_TOOLRUNNER_")

    service_name: str = "toolrunner"
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis holding the registry, rate limits and the effect ledger.",
    )
    key_prefix: str = Field(
        default="toolrunner",
        pattern=r"^[a-zA-Z0-9_.-]{1,64}$",
        description="Prefix of every Redis key the service writes.",
    )
    ledger_ttl_seconds: int = Field(
        default=86_400, ge=60, description="How long recorded tool outcomes are kept."
    )
    request_id_ttl_seconds: int = Field(
        default=86_400, ge=60, description="How long registry request ids are remembered."
    )
    builtin_tools: bool = Field(
        default=True,
        description="Register the built-in tools (calculator, current_time, python) at start "
        "when the registry lacks them.",
    )
    sandbox_mode: str = Field(
        default="auto",
        pattern=r"^(auto|bubblewrap|process)$",
        description="auto: bubblewrap when it works, else the process sandbox; or force one.",
    )
    sandbox_python: str = Field(
        default="",
        description="Interpreter that runs `python` tool snippets; empty: the service's own.",
    )
    sandbox_uid_base: int = Field(
        default=420_000,
        ge=1000,
        description="When the service runs as root, each concurrent sandbox runs as its own "
        "unprivileged uid/gid from this base upwards.",
    )
    sandbox_max_concurrent: int = Field(
        default=32, ge=1, le=4096, description="Most sandboxed processes running at once."
    )
    sandbox_pool_size: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Sandboxes started ahead of need per policy in use, each used for one call "
        "only; 0 starts every sandbox on demand.",
    )
    default_memory_bytes: int = Field(default=512 * MIB, ge=16 * MIB)
    default_cpu_seconds: float = Field(default=10.0, gt=0)
    default_max_processes: int = Field(default=16, ge=1, le=1024)
    default_max_open_files: int = Field(default=64, ge=16, le=65536)
    default_max_file_size_bytes: int = Field(default=16 * MIB, ge=0)
    default_work_dir_bytes: int = Field(default=64 * MIB, ge=MIB)
    max_memory_bytes: int = Field(default=4096 * MIB, ge=16 * MIB)
    max_cpu_seconds: float = Field(default=900.0, gt=0)
    http_fetch_max_bytes: int = Field(default=4 * MIB, ge=1024)
    secret_values: dict[str, str] = Field(
        default_factory=dict,
        description="Secrets an MCP server's secret_env / secret_headers may name (JSON object).",
        repr=False,
    )
