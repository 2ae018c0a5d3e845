"""Settings: which listening addresses keep lmx to this machine, and how this machine reaches
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmx.settings import Settings


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("0:0:0:0:0:0:0:1", True),  # ::1 written out
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("127.example.com", False),  # a name, not an address
        ("studio.local", False),
    ],
)
def test_loopback_is_the_address_not_its_spelling(host: str, loopback: bool) -> None:
    assert Settings.from_env(home=Path("/nonexistent"), host=host).is_loopback is loopback


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("localhost", "http://localhost:8080"),
        ("studio.local", "http://studio.local:8080"),
        ("::1", "http://[::1]:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),  # every address: reached by loopback
        ("::", "http://[::1]:8080"),
        ("192.168.1.20", "http://192.168.1.20:8080"),
    ],
)
def test_a_client_on_this_machine_reaches_a_wildcard_address_by_loopback(
    host: str, url: str
) -> None:
    assert Settings.from_env(home=Path("/nonexistent"), host=host, port=8080).local_url == url


def test_a_stop_gives_answers_under_way_the_grace_the_environment_sets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert Settings.from_env(home=tmp_path).stop_grace_s == 20.0
    monkeypatch.setenv("LMX_STOP_GRACE_S", "2.5")
    assert Settings.from_env(home=tmp_path).stop_grace_s == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("LMX_STOP_GRACE_S", bad)
        with pytest.raises(ValueError, match=f"invalid LMX_STOP_GRACE_S '{bad}': give seconds"):
            Settings.from_env(home=tmp_path)
