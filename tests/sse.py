"""Reading the streams of named server-sent events (Responses, Messages, LM Studio's /api/v1)."""

from __future__ import annotations

import json
from typing import Any


def named_events(stream: bytes) -> list[dict[str, Any]]:
    """Each event's data, in order, each checked to be named by its `type`."""
    out = []
    for block in stream.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            out.append(event)
    return out
