"""Configuration of the QA review web app (`inspection review ...`)."""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from inspection.errors import ConfigError

ROLES = ("reviewer", "admin")


@dataclass(frozen=True)
class ReviewConfig:
    store: str = ""  # decision store: a folder written by the runner, a .sqlite file, or an SQLAlchemy URL
    media_dir: str | None = None  # where image/heatmap paths are resolved; None = the store's own folder
    host: str = "127.0.0.1"  # loopback by default: put a TLS reverse proxy in front to open it to the plant LAN
    port: int = 8600  # clear of the runner's default port so both run on one box
    title: str = "Casting QA review"  # shown in the header and the browser tab
    display_timezone: str = "UTC"  # times on the pages and in the filters (IANA name, e.g. Europe/Berlin); stored UTC
    session_hours: float = 12.0  # one shift plus overtime; a reviewer logs in once per shift
    cookie_secure: bool = False  # set true behind HTTPS; false lets the app work over plain loopback HTTP
    page_size: int = 50  # queue rows per page: a screenful, so nobody scrolls past waiting parts
    min_password_length: int = 10  # passphrases, not PINs; argon2 makes guessing slow but not impossible
    password_time_cost: int = 3  # argon2id passes (argon2-cffi's RFC 9106 low-memory profile: ~0.1-0.3 s a login)
    password_memory_kib: int = 65536  # argon2id memory per hash: 64 MiB makes GPU guessing expensive
    max_login_failures: int = 5  # per user name inside the lockout window, then logins are refused ...
    login_lockout_s: float = 300.0  # ... for this long: enough to stop guessing, short enough not to block a shift
    stats_default_hours: float = 24.0  # the statistics page covers the last day (hourly bars) unless asked otherwise
    # photos of one part id at one station taken within this many seconds of its first photo are one part in the
    # queue (a re-shot, a burst of repeats): QA decides once for all of them; 0 keeps every photo on its own
    part_window_s: float = 600.0
    # an ingest store (folder with manifest.sqlite): its parts whose photos carry both labels get their own queue,
    # where one decision relabels every photo of the part for the next retrain; None hides that queue
    ingest_store: str | None = None
    # a model registry folder: the part page's defect-type choices start with the part's model's own types (its
    # card's `defect_types`); None = the types the decision store holds as that model's answers (then QA's enum)
    registry: str | None = None

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"review.port: got {self.port}, allowed 1..65535")
        if self.session_hours <= 0:
            raise ConfigError(f"review.session_hours: got {self.session_hours}, must be > 0")
        if not 1 <= self.page_size <= 1000:
            raise ConfigError(f"review.page_size: got {self.page_size}, allowed 1..1000")
        if self.min_password_length < 8:
            raise ConfigError(f"review.min_password_length: got {self.min_password_length}, must be at least 8")
        if self.password_time_cost < 1 or self.password_memory_kib < 1024:
            raise ConfigError(
                f"review.password_time_cost must be >= 1 (got {self.password_time_cost}) and "
                f"review.password_memory_kib >= 1024 (got {self.password_memory_kib})"
            )
        if self.max_login_failures < 1 or self.login_lockout_s < 0:
            raise ConfigError("review.max_login_failures must be >= 1 and review.login_lockout_s >= 0")
        try:
            ZoneInfo(self.display_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"review.display_timezone: {self.display_timezone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)"
            ) from None
        if self.stats_default_hours <= 0:
            raise ConfigError(f"review.stats_default_hours: got {self.stats_default_hours}, must be > 0")
        if not 0 <= self.part_window_s <= 7 * 24 * 3600:
            raise ConfigError(f"review.part_window_s: got {self.part_window_s}, allowed 0..604800 (a week)")
