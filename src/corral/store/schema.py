"""The tables of Corral's store, in SQLAlchemy Core, portable to SQLite and PostgreSQL.

Portable means: no dialect-only SQL, timestamps as timezone-aware UTC (`UTCDateTime`),
JSON through `sqlalchemy.JSON` (JSONB on PostgreSQL), named constraints so Alembic can
alter them on either database. The migrations in `corral.store.migrations` create
exactly these tables; a test checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

from corral.states import JOB_STATES, SANDBOX_STATES

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    SQLite has no time zones: values are stored as naive UTC text and come back aware.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Corral stores aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(32)
# A sandbox row's network before one was asked for (and rows older than the column).
NO_NETWORK = '{"mode": "none", "allow": []}'

metadata = sa.MetaData(naming_convention=NAMING)

teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("max_sandboxes", sa.Integer, nullable=False),
    # Totals over the team's live sandboxes (and running jobs' sandboxes).
    sa.Column("max_memory_mib", sa.Integer, nullable=False),
    sa.Column("max_cpu", sa.Float, nullable=False),
    sa.Column("max_disk_mib", sa.Integer, nullable=False),
    # Jobs of the team running at once, and the job logs it may keep stored.
    sa.Column("max_running_jobs", sa.Integer, nullable=False),
    sa.Column("max_log_mib", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Bytes of job logs the team's jobs keep (the sum of their `log_bytes`), kept up to
    # date with every log write and deletion, so the quota check reads one row.
    sa.Column("log_bytes", sa.BigInteger, nullable=False, server_default="0"),
    # Rate limits of each of the team's API keys (`corral.server.ratelimit`): requests a
    # second and streams open at once; 0: the server's (CORRAL_API_RATE, _STREAMS).
    sa.Column("max_api_rate", sa.Float, nullable=False, server_default="0"),
    sa.Column("max_api_streams", sa.Integer, nullable=False, server_default="0"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    # The first characters of the key, to show and to revoke by; never the whole key.
    sa.Column("prefix", sa.String(16), nullable=False),
    # sha256 hex digest of the whole key.
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Index(None, "team_id"),
    sa.Index(None, "prefix"),
)

sandboxes = sa.Table(
    "sandboxes",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    sa.Column("template", sa.String(128), nullable=False),
    sa.Column("isolation", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False),
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("limits", JSON, nullable=False),
    sa.Column("envs", JSON, nullable=False),
    sa.Column("timeout_seconds", sa.Integer, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("idle_timeout_seconds", sa.Integer, nullable=False),
    sa.Column("on_idle", sa.String(8), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("last_activity_at", UTCDateTime, nullable=False),
    # The server process that runs the sandbox: host name, pid and kernel start time
    # (clock ticks), so a restarted server can tell a dead owner from a live one, and
    # servers sharing one database judge only their own host's rows.
    sa.Column("owner_host", sa.String(255), nullable=False),
    sa.Column("owner_pid", sa.Integer, nullable=False),
    sa.Column("owner_start", sa.BigInteger, nullable=False),
    # Its network policy: {"mode": "none" | "internet" | "allowlist", "allow": [entries]}.
    sa.Column("network", JSON, nullable=False, server_default=NO_NETWORK),
    # Port exposure: the token the port proxy asks for (empty when the ports are public).
    sa.Column("traffic_token", sa.String(64), nullable=False, server_default=""),
    sa.Column("public_ports", sa.Boolean, nullable=False, server_default=sa.false()),
    # Its volumes: [{"name", "path", "read_only"}].
    sa.Column("volumes", JSON, nullable=False, server_default="[]"),
    # Its writable layer is a tmpfs (its writes are memory), not a disk.
    sa.Column("ram_disk", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint(sa.column("state").in_(SANDBOX_STATES), name="state"),
    sa.CheckConstraint(sa.column("on_idle").in_(("pause", "kill")), name="on_idle"),
    # List pages: a team's sandboxes in creation order, filtered by state.
    sa.Index(None, "team_id", "created_at", "id"),
    sa.Index(None, "team_id", "state"),
    # Start-up: every live row, to find those whose server died.
    sa.Index(None, "state"),
)

sandbox_events = sa.Table(
    "sandbox_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("sandbox_id", ID, sa.ForeignKey("sandboxes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index(None, "sandbox_id", "id"),
)

metric_points = sa.Table(
    "metric_points",
    metadata,
    sa.Column(
        "sandbox_id",
        ID,
        sa.ForeignKey("sandboxes.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # "10m", "2h" or "24h": which ring the point comes from.
    sa.Column("resolution", sa.String(8), primary_key=True),
    sa.Column("at", UTCDateTime, primary_key=True),
    sa.Column("cpu_percent", sa.Float, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("memory_peak_bytes", sa.BigInteger, nullable=False),
    sa.Column("pids", sa.Integer, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("template", sa.String(128), nullable=False),
    # Asked for ("auto" when left out); workers claim only what they can give.
    sa.Column("isolation", sa.String(32), nullable=False),
    # The memory limit of its sandbox (its limits, defaults filled at submit): a worker
    # claims only jobs that fit the host's free memory.
    sa.Column("memory_mib", sa.Integer, nullable=False),
    sa.Column("spec", JSON, nullable=False),
    sa.Column("labels", JSON, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    # Times a worker vanished mid-attempt; past the server's budget the job is lost.
    sa.Column("lost_count", sa.Integer, nullable=False),
    # A queued job is not claimed before this (retry backoff).
    sa.Column("run_after", UTCDateTime, nullable=False),
    sa.Column("worker", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("cancel_reason", sa.Text, nullable=True),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("next_log_seq", sa.BigInteger, nullable=False),
    sa.Column("log_bytes", sa.BigInteger, nullable=False),
    sa.Column("log_truncated", sa.Boolean, nullable=False),
    sa.Column("next_event_seq", sa.Integer, nullable=False),
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("callback_secret", sa.String(64), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # The W3C traceparent of the span that submitted it (traces on, else NULL): each
    # attempt's `job.run` span is that span's child.
    sa.Column("traceparent", sa.String(55), nullable=True),
    sa.CheckConstraint(sa.column("state").in_(JOB_STATES), name="state"),
    # Claims: when a team's last job started (teams served longest ago go first).
    sa.Index(None, "team_id", "started_at"),
    # List pages: a team's jobs, newest first.
    sa.Index(None, "team_id", "created_at", "id"),
    # Lease expiry: running jobs by deadline.
    sa.Index(None, "state", "lease_expires_at"),
    # Retention: finished jobs, oldest first (only final jobs have a finished_at).
    sa.Index(None, "finished_at"),
)


def _partial(where: sa.ColumnElement[bool]) -> dict[str, Any]:
    """The options of an index of only the rows `where` holds for, on both databases."""
    return {"postgresql_where": where, "sqlite_where": where}


# The indexes a claim reads (corral.store.claims) hold only the jobs it looks at: a team's
# queued jobs in its own priority order, and its running ones (counted). Being partial,
# they are the planner's obvious choice even before it has statistics (a new database, a
# queue that grew a thousandfold within the minute before autovacuum's next ANALYZE):
# with stale statistics PostgreSQL took any index on team_id, and sorted all of the
# team's jobs at each claim. For the same reason the idempotency keys' index holds only
# the jobs that have one.
sa.Index(
    "ix_jobs_queued_team_id_priority_created_at_id",
    jobs.c.team_id,
    jobs.c.priority.desc(),
    jobs.c.created_at,
    jobs.c.id,
    **_partial(jobs.c.state == "queued"),
)
sa.Index("ix_jobs_running_team_id", jobs.c.team_id, **_partial(jobs.c.state == "running"))
sa.Index(
    "uq_jobs_team_id_idempotency_key",
    jobs.c.team_id,
    jobs.c.idempotency_key,
    unique=True,
    **_partial(jobs.c.idempotency_key.is_not(None)),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", ID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    # state | step_start | step_end | log_truncated | retry_scheduled | requeued
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("data", JSON, nullable=False),
)

# A job's output, one row per run of one stream in one write. A job's first bytes are in
# `data`; the rest (SQLite) in the job's log file beside the database (see
# `corral.store.logfiles`): `file_offset` says where, `data` is then empty. `size` is
# the chunk's length either way.
job_logs = sa.Table(
    "job_logs",
    metadata,
    sa.Column("job_id", ID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    # 1 stdout, 2 stderr (the LogStream numbers of the API)
    sa.Column("stream", sa.SmallInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("file_offset", sa.BigInteger, nullable=True),
)

# The outbox of callback deliveries: written with the event they carry, delivered by
# whichever process claims them, so none is lost when a process dies.
job_callbacks = sa.Table(
    "job_callbacks",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("job_id", ID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("event_seq", sa.Integer, nullable=False),
    sa.Column("critical", sa.Boolean, nullable=False),
    # pending | delivered | failed
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.Column("payload", JSON, nullable=False),
    sa.Column("delivered_at", UTCDateTime, nullable=True),
    sa.Index(None, "state", "next_attempt_at"),
    sa.Index(None, "job_id"),
)

# What a sandbox's network did: DNS answers and refusals, connections allowed and denied,
# and "suppressed" rows counting what the rate limit folded away. `seq` counts per
# sandbox from 0 with no gaps, so the rows a per-sandbox cap removed are the seqs below
# the first one kept. A job's sandbox also records the job, and `job_seq` places the row
# in the job's event stream (the seqs of `job_events`, shared). No foreign key on
# `sandbox_id`: a job's sandbox has no row in `sandboxes`.
network_events = sa.Table(
    "network_events",
    metadata,
    sa.Column("sandbox_id", ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("job_id", ID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True),
    sa.Column("job_seq", sa.Integer, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    # dns | connect | suppressed
    sa.Column("kind", sa.String(16), nullable=False),
    # allowed | denied
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("rule", sa.Text, nullable=False),
    sa.Column("protocol", sa.String(8), nullable=False),
    sa.Column("address", sa.String(64), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("answers", JSON, nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Index(None, "job_id", "job_seq"),
)

# Named volumes: a team's persistent directories (`corral.sandboxes.volumes`); the data is
# an image file under the data dir named by team and name.
volumes = sa.Table(
    "volumes",
    metadata,
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("size_mib", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # What its image took on the host's disk when last looked at (Get, List).
    sa.Column("used_bytes", sa.BigInteger, nullable=False),
)

# Templates (corral.templates): one row per build of a team's template name. A name's
# sandboxes start from its newest `ready` row; a rebuild adds a `building` row and the
# old ready one serves until the new one is ready, then goes. `layers` are digests bottom
# first; `request` is what the build job reads (its plan, network policy, ready timeout),
# emptied when the build ends (it may hold registry credentials).
templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("layers", JSON, nullable=False),
    sa.Column("env", JSON, nullable=False),
    sa.Column("workdir", sa.Text, nullable=True),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("start_cmd", sa.Text, nullable=True),
    sa.Column("ready_cmd", sa.Text, nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("build_job_id", ID, nullable=True),
    sa.Column("steps_total", sa.Integer, nullable=False),
    sa.Column("steps_cached", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("request", JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Its sandboxes' defaults (corral.templates.defaults): the limit fields it sets, and a
    # network policy or null.
    sa.Column("sandbox_limits", JSON, nullable=False, server_default="{}"),
    sa.Column("sandbox_network", JSON, nullable=True),
    sa.CheckConstraint(
        sa.column("state").in_(("building", "ready", "failed", "cancelled")), name="state"
    ),
    sa.Index(None, "team_id", "name", "created_at"),
    sa.Index(None, "build_job_id"),
)

# The build step cache: a step's cache key (corral.images.cache_key) -> the layer it made.
build_cache = sa.Table(
    "build_cache",
    metadata,
    sa.Column("key", sa.String(80), primary_key=True),
    sa.Column("layer", sa.String(80), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_used_at", UTCDateTime, nullable=False),
    sa.Index(None, "layer"),
)

# Vms (`corral vm`): a team's named sandbox definitions. `sandbox_id` is the sandbox the
# vm last started (running while that sandbox is); its /persist volume is `vm-<name>`.
vms = sa.Table(
    "vms",
    metadata,
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("language", sa.String(16), nullable=False),
    sa.Column("cpu", sa.Float, nullable=False),
    sa.Column("memory_mib", sa.Integer, nullable=False),
    sa.Column("network", sa.String(16), nullable=False),
    sa.Column("persist", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sandbox_id", ID, nullable=True),
    sa.Column("isolation", sa.String(16), nullable=False, server_default="auto"),
)

# E2B compatibility (`corral.server.e2b`): what E2B's API says about a sandbox created
# through it, beside Corral's own row. `envd_access_token` is the credential of its envd
# routes ("" for a sandbox created with secure=false: reached by its id, as on E2B).
e2b_sandboxes = sa.Table(
    "e2b_sandboxes",
    metadata,
    sa.Column(
        "sandbox_id", ID, sa.ForeignKey("sandboxes.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("envd_access_token", sa.String(64), nullable=False),
    sa.Column("client_id", sa.String(64), nullable=False),
    # The template as the caller named it (its alias).
    sa.Column("alias", sa.String(128), nullable=False),
    # On its timeout it is paused, not killed.
    sa.Column("auto_pause", sa.Boolean, nullable=False),
    sa.Column("envs", JSON, nullable=False),
)
