"""The daemon composed in process, its port left unbound (no test listens beyond loopback): what
it tells the person at start."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from lmx.daemon import Daemon, StartupError, default_manifest, ensure_config
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


def test_a_config_link_to_a_file_not_there_is_kept_and_the_start_refused(tmp_path: Path) -> None:
    """A dotfiles link whose target is away (an unmounted volume, a moved repo) is not replaced
    by the default manifest: edits to the target would never be seen again."""
    settings = Settings.from_env(home=tmp_path / "home")
    settings.home.mkdir()
    target = tmp_path / "dotfiles" / "config.yaml"
    settings.config_path.symlink_to(target)
    with pytest.raises(StartupError, match=f"links to {target}, which does not exist"):
        ensure_config(settings)
    assert settings.config_path.is_symlink() and not target.parent.exists()
    settings.config_path.unlink()
    ensure_config(settings)  # a fresh home's: the default
    assert settings.config_path.read_text() == default_manifest()
