"""The responses /v1/responses keeps (`store`, true unless false): for `previous_response_id`, and
GET and DELETE /v1/responses/{id} and its input_items. In memory, bounded in bytes, the least
recently used dropped first; the daemon's stores are also on disk (lmx.api.response_shelf), so
that a restart forgets none. A request continuing one no longer kept gets OpenAI's 400
`previous_response_not_found` (a client that handles it sends the whole conversation again).
lmx.api.responses decides what a response's conversation and input items are.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from lmx.api.response_shelf import Shelf, open_shelf
from lmx.errors import RequestError, ResponseNotFound

log = structlog.get_logger(__name__)

# What the kept responses may take, counted as JSON: each its input and its answer (with its
# request's fields, tools among them), not the conversation before it, which it shares with the
# response it continues. An agent's 100 turns to a 100k-token conversation with 10 KiB of tools
# count about 1.4 MiB.
KEEP_BYTES = 64 * 2**20

# The id prefix of an input item given without an id, by its type.
_ITEM_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "local_shell_call": "lsh",
    "local_shell_call_output": "lsho",
    "reasoning": "rs",
}


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Kept:
    response: dict[str, Any]  # as answered
    conversation: tuple[dict[str, Any], ...]  # as chat messages, instructions left out, it last
    items: tuple[dict[str, Any], ...]  # its input items, each with an id (listed_items)
    nbytes: int


class ResponseStore:
    """The responses kept, least recently used first; beyond `max_bytes` the least recently
    used go. A response continued or fetched is used again, and those before it in its
    conversation with it: its conversation holds their messages, so dropping them alone would
    free little."""

    def __init__(self, max_bytes: int = KEEP_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self._previous: dict[str, str] = {}  # a kept response's id: the one it continued
        self._shelf: Shelf | None = None  # told each change, to write it to disk (on_disk)

    @classmethod
    def on_disk(cls, path: Path, max_bytes: int = KEEP_BYTES) -> ResponseStore:
        """A store that keeps its responses in the file at `path` too, and holds those it kept
        there before (as many as `max_bytes` holds, the most recently used)."""
        shelf, shelved = open_shelf(path)
        store = cls(max_bytes)
        for _rid, previous, response, conversation, items, nbytes in shelved:
            store.keep(Kept(response, conversation, items, nbytes), previous)
        dropped = [rid for rid, *_ in shelved if rid not in store._kept]
        if dropped:
            shelf.drop(dropped)
        store._shelf = shelf
        return store

    def __len__(self) -> int:
        return len(self._kept)

    def close(self) -> None:
        """Write what is left to disk."""
        if self._shelf is not None:
            self._shelf.close()

    def get(self, response_id: str) -> dict[str, Any]:
        """The response as answered. Raises ResponseNotFound."""
        return self._used(response_id).response

    def conversation(self, response_id: str) -> tuple[dict[str, Any], ...]:
        """The conversation a response ended, its answer last. Raises ResponseNotFound."""
        return self._used(response_id).conversation

    def continued(self, previous_response_id: str | None) -> tuple[dict[str, Any], ...]:
        """The conversation a request continues (none without `previous_response_id`). Raises
        OpenAI's 400 `previous_response_not_found` for one not kept."""
        if previous_response_id is None:
            return ()
        try:
            return self.conversation(previous_response_id)
        except ResponseNotFound:
            raise RequestError(
                f"Previous response with id {previous_response_id!r} not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            ) from None

    def delete(self, response_id: str) -> None:
        """Forget a response; those continuing it keep their conversations. Raises
        ResponseNotFound."""
        kept = self._kept.pop(response_id, None)
        if kept is None:
            raise ResponseNotFound(response_id)
        self._previous.pop(response_id, None)
        self.nbytes -= kept.nbytes
        if self._shelf is not None:
            self._shelf.drop([response_id])

    def input_items(
        self, response_id: str, *, limit: int, order: str, after: str | None
    ) -> dict[str, Any]:
        """A page of a response's input items, as OpenAI lists them: `limit` of them in `order`
        (asc or desc), from the one after `after`. Raises ResponseNotFound, RequestError."""
        items = self._used(response_id).items
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise RequestError(
                    f"response {response_id!r} has no input item {after!r}", param="after"
                )
            items = items[ids.index(after) + 1 :]
        page = list(items[:limit])
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    def keep(self, kept: Kept, previous: str | None) -> None:
        """Keep a response (`previous`: the one it continued), unless it alone is larger than
        the store."""
        rid = kept.response["id"]
        if kept.nbytes > self.max_bytes:
            log.warning("response_not_kept", id=rid, bytes=kept.nbytes, most=self.max_bytes)
            return
        dropped = []
        while self._kept and self.nbytes + kept.nbytes > self.max_bytes:
            gone, old = self._kept.popitem(last=False)
            self._previous.pop(gone, None)
            self.nbytes -= old.nbytes
            dropped.append(gone)
        self._kept[rid] = kept
        if previous is not None:
            self._previous[rid] = previous
        self.nbytes += kept.nbytes
        if self._shelf is not None:
            if dropped:
                self._shelf.drop(dropped)
            self._shelf.put(kept, previous)

    def _used(self, response_id: str) -> Kept:
        """The kept response, now the most recently used, with its conversation's earlier ones
        just before it. Raises ResponseNotFound."""
        kept = self._kept.get(response_id)
        if kept is None:
            raise ResponseNotFound(response_id)
        chain = [response_id]
        while (earlier := self._previous.get(chain[-1])) is not None and earlier in self._kept:
            chain.append(earlier)
        chain.reverse()
        for rid in chain:
            self._kept.move_to_end(rid)
        if self._shelf is not None:
            self._shelf.touch(chain)
        return kept


def listed_items(given: str | list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Input items as OpenAI lists them: each with an id and a type, a message's text as a
    part (input_text, output_text for the assistant's)."""
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given
    out = []
    for item in items:
        kind = item.get("type", "message")
        listed = {"id": item_id(_ITEM_PREFIXES.get(kind, "item")), "type": kind, **item}
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            listed["content"] = [{"type": part, "text": item["content"]}]
        out.append(listed)
    return tuple(out)
