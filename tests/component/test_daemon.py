"""The daemon composed in process, its port left unbound (no test listens beyond loopback): what
it tells the person at start."""

from __future__ import annotations

from pathlib import Path

import httpx
from structlog.testing import capture_logs

from lmx.daemon import Daemon
from lmx.settings import Settings


async def test_beyond_loopback_without_api_keys_the_daemon_warns_at_start_and_in_status(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.yaml").write_text("models: {}\n")
    daemon = Daemon(Settings.from_env(home=tmp_path, host="0.0.0.0", port=1234))
    with capture_logs() as logs:
        await daemon.startup()
    try:
        warned = [e for e in logs if e["event"] == "api_open_to_network"]
        assert [(e["log_level"], e["host"]) for e in warned] == [("warning", "0.0.0.0")]
        assert "server.api_keys" in warned[0]["fix"]
        auth = {"Authorization": f"Bearer {daemon.admin_key()}"}
        transport = httpx.ASGITransport(app=daemon.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
            doc = (await c.get("/admin/status", headers=auth)).json()
        assert len(doc["warnings"]) == 1 and "server.api_keys" in doc["warnings"][0]
    finally:
        await daemon.shutdown()
