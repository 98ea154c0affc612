"""One typed, frozen settings object, read once from ``SHAREDCARE_*`` and an optional file.

Precedence (highest first): keyword arguments (the CLI's flags), environment variables,
the TOML file named by ``SHAREDCARE_CONFIG_FILE``, then the defaults below. The README's
settings table is kept complete by ``tests/test_docs.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "SHAREDCARE_"
CONFIG_FILE_ENV = "SHAREDCARE_CONFIG_FILE"


class Settings(BaseSettings):
    """Every setting of a hub process. Field descriptions are the operator documentation."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    config_file: Path | None = Field(
        None, description="Optional TOML file with any of these settings (lower-case names)."
    )
    data_dir: Path = Field(
        Path("sharedcare-data"),
        description="Folder for the embedded SQLite database, object storage and demo files.",
    )
    database_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the database. Unset: SQLite at DATA_DIR/sharedcare.db. "
            "PostgreSQL: postgresql+asyncpg://user@host:5432/db."
        ),
    )
    object_store_dir: Path | None = Field(
        None, description="Folder used as object storage. Unset: DATA_DIR/objects."
    )
    host: str = Field("127.0.0.1", description="Interface `sharedcare serve` listens on.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port `sharedcare serve` listens on.")
    workers: int = Field(1, ge=1, le=64, description="Hub worker processes for `serve`.")
    http_keepalive_seconds: float = Field(
        75.0,
        gt=0,
        le=3600,
        description=(
            "How long `serve` keeps an idle client connection open. Keep it above the idle "
            "timeout of any load balancer in front (60 s on many), or the hub may close a "
            "connection just as the balancer sends a request on it."
        ),
    )
    base_url: str | None = Field(
        None,
        description="Public base URL used in links and fullUrls. Unset: http://HOST:PORT.",
    )
    auto_migrate: bool = Field(
        True, description="Apply database migrations at start-up (`sharedcare db upgrade`)."
    )
    db_pool_size: int = Field(20, ge=1, le=200, description="Database connections per process.")
    queue_keep_done_hours: float = Field(
        168.0,
        ge=0,
        description=(
            "How long finished items of the hub's durable queues (message pushes, PDS traces) "
            "are kept before they are deleted; 0 keeps them forever. Dead letters are never deleted."
        ),
    )
    db_pool_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=60,
        description=(
            "Longest a request waits for a free database connection before it is answered "
            "503 with Retry-After (the hub is at capacity)."
        ),
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "NORMAL",
        description=(
            "SQLite `synchronous` pragma. NORMAL (WAL) survives a killed process; "
            "FULL also survives power loss."
        ),
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above it)."
    )
    default_page_size: int = Field(50, ge=1, description="Search page size when `_count` is absent.")
    max_page_size: int = Field(1000, ge=1, description="Largest `_count` honoured.")
    max_bundle_entries: int = Field(
        5000, ge=1, description="Most entries accepted in one batch or transaction Bundle."
    )
    log_level: Literal["debug", "info", "warning", "error", "fatal"] = Field(
        "info", description="Lowest log level written."
    )
    log_json: bool = Field(True, description="Write logs as JSON lines (false: console format).")
    token_lifetime_seconds: int = Field(
        300, ge=30, le=300, description="Lifetime of the access tokens the hub issues (SMART: at most 300 s)."
    )
    hub_key_alg: Literal["RS384", "ES384"] = Field(
        "RS384",
        description="Algorithm of the hub's token-signing keys (RS384 verifies fastest; ES384 keys are quick to make).",
    )
    hub_key_rotation_hours: float = Field(
        24.0,
        gt=0,
        le=24 * 90,
        description=(
            "A new hub signing key every this many hours; old keys stay in the JWKS until "
            "the tokens they signed have expired."
        ),
    )
    registry_cache_seconds: float = Field(
        2.0,
        ge=0,
        le=60,
        description=(
            "How long a hub process trusts its cached copy of a participant system: a "
            "suspension or key change reaches every process within this time."
        ),
    )
    rate_limit_per_second: float = Field(
        1000.0,
        ge=0,
        description="Requests per second allowed per client system, shared by all hub processes (0: no limit).",
    )
    rate_limit_burst: int = Field(
        2000, ge=1, description="Largest burst per client system above its steady rate (token bucket size)."
    )
    # -- synchronous federated query (issue 6) ---------------------------------------------
    query_provider_wait_ms: int = Field(
        1500, ge=1, le=60_000,
        description="How long a federated query waits for each provider before reporting it as timed out.",
    )
    query_max_provider_wait_ms: int = Field(
        5000, ge=1, le=60_000,
        description="Cap on the per-request override X-Provider-Wait-Time (also YHCR-Provider-Wait-time); larger values are capped.",
    )
    query_connect_timeout_ms: int = Field(
        500, ge=1, le=60_000,
        description="Longest wait to open a connection to a provider (never longer than the provider wait).",
    )
    query_provider_connections: int = Field(
        64, ge=1, le=10_000, description="Pooled keep-alive connections per provider per hub process."
    )
    query_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failures (timeouts, connection errors, 5xx, invalid FHIR) that open a provider's circuit breaker."
    )
    query_breaker_open_seconds: float = Field(
        10.0, gt=0, le=3600,
        description="How long an open circuit breaker answers for the provider (one trial request is then let through).",
    )
    query_cursor_lifetime_seconds: int = Field(
        900, ge=10, le=86_400, description="How long a federated query's `next` link stays valid."
    )
    # -- consent and audit (issue 5) --------------------------------------------------------
    consent_policy_file: Path | None = Field(
        None,
        description=(
            "Regional information-sharing policy (TOML). Unset: the policy shipped with sharedcare. "
            "Reloaded on SIGHUP and when the file changes; a bad new file keeps the old policy (logged)."
        ),
    )
    consent_policy_check_seconds: float = Field(
        5.0, ge=0, description="How often each hub process checks the policy file for changes (0: only on SIGHUP)."
    )
    consent_records_refresh_seconds: float = Field(
        300.0, ge=0, description="How often the consent-records-by-policy gauge is recounted (0: at start only)."
    )

    # -- patient index (pix, issue 4) --------------------------------------------------------
    pds_base_url: str | None = Field(
        None,
        description=(
            "Base URL of the PDS-compatible FHIR endpoint registrations are traced against "
            "(GET {base}/Patient/{nhs}). Unset: traces wait in the queue and registrations stay pending."
        ),
    )
    pds_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Longest wait for one PDS trace before it counts as a transient error."
    )
    pix_trace_concurrency: int = Field(
        16, ge=1, le=256, description="PDS traces in flight at once per hub process."
    )
    pix_count_seconds: float = Field(
        60.0,
        ge=1,
        description="How often each hub process refreshes the people and linkage count metrics.",
    )
    # -- reliable messaging (issue 7) --------------------------------------------------------
    messaging_workers: bool = Field(
        True,
        description=(
            "Run push-delivery workers inside each `sharedcare serve` process. false: run them "
            "separately with `sharedcare messages worker`."
        ),
    )
    messaging_max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest message accepted by $process-message (413 above it)."
    )
    messaging_expiry_seconds: float = Field(
        86_400.0,
        gt=0,
        description=(
            "A message not delivered (pushed with a 2xx, or acknowledged from the mailbox) within this "
            "time is dead-lettered and its sender gets a fatal-error response."
        ),
    )
    messaging_retry_base_seconds: float = Field(
        1.0, gt=0, description="First retry delay of a failed push; doubles per attempt, with full jitter."
    )
    messaging_retry_cap_seconds: float = Field(
        300.0, gt=0, description="Longest delay between two push attempts to a recipient."
    )
    messaging_delivery_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Longest wait for a recipient to answer one push."
    )
    messaging_concurrency: int = Field(
        128, ge=1, le=10_000, description="Pushes in flight at once per delivery worker."
    )
    messaging_per_recipient_concurrency: int = Field(
        16, ge=1, le=1_000, description="Pushes in flight at once to one recipient per delivery worker."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            if not Path(path).is_file():
                raise ValueError(f"{CONFIG_FILE_ENV}={path} does not name a readable file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size must not exceed max_page_size")
        return self

    # Derived values: computed here once so every capability agrees on them.
    @property
    def database(self) -> str:
        """The effective database URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'sharedcare.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.database.startswith("sqlite")

    @property
    def objects_dir(self) -> Path:
        return self.object_store_dir or self.data_dir / "objects"

    @property
    def public_base_url(self) -> str:
        """Base URL without a trailing slash; follows host and port unless set."""
        if self.base_url:
            return self.base_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def fhir_base(self) -> str:
        return f"{self.public_base_url}/fhir"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and optional file, with explicit overrides on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
