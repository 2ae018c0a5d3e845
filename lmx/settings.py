"""Process settings: where lmx keeps its files and where it listens. Read once, at start-up.

Built by the CLI from flags and the environment and passed down explicitly; there is no module
level singleton. Imports nothing else from lmx.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 1234
DEFAULT_HOST = "127.0.0.1"
# How long a stopping daemon lets the answers under way finish before it ends them (each with an
# error, as OpenAI's streams end one): within the 30 s launchd and systemd give it to stop.
DEFAULT_STOP_GRACE_S = 20.0


def default_home() -> Path:
    return Path(os.environ.get("LMX_HOME") or "~/.opta-lmx").expanduser()


@dataclass(frozen=True)
class Settings:
    home: Path
    config_path: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    stop_grace_s: float = DEFAULT_STOP_GRACE_S

    @classmethod
    def from_env(
        cls,
        *,
        config: Path | None = None,
        host: str | None = None,
        port: int | None = None,
        home: Path | None = None,
    ) -> Settings:
        """Raises ValueError, saying so, for an $LMX_PORT that is no number or an
        $LMX_STOP_GRACE_S that is no number of seconds."""
        home = (home or default_home()).expanduser()
        raw = os.environ.get("LMX_STOP_GRACE_S") or str(DEFAULT_STOP_GRACE_S)
        try:
            grace = float(raw)
        except ValueError:
            grace = -1.0
        if not 0 <= grace < float("inf"):
            raise ValueError(f"invalid LMX_STOP_GRACE_S {raw!r}: give seconds, 0 or more")
        return cls(
            home=home,
            config_path=(config or home / "config.yaml").expanduser(),
            host=host or env_host(),
            port=env_port() if port is None else port,
            stop_grace_s=grace,
        )

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can reach the port (127.0.0.0/8, ::1 in any spelling)."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a name: only localhost is known to stay on this machine
            return self.host == "localhost"

    @property
    def local_url(self) -> str:
        return local_url(self.host, self.port)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def env_host() -> str:
    return os.environ.get("LMX_HOST") or DEFAULT_HOST


def env_port() -> int:
    """$LMX_PORT, else 1234. Raises ValueError, saying so, for one that is no number."""
    raw = os.environ.get("LMX_PORT") or str(DEFAULT_PORT)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"invalid LMX_PORT {raw!r}: give a port number") from None


def local_url(host: str, port: int | str) -> str:
    """Where a client on this machine reaches a daemon listening on host:port. A wildcard address
    (0.0.0.0, ::) is no destination: it is reached by the loopback address of its family."""
    with contextlib.suppress(ValueError):  # a name is used as it is
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ":" in host else "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
