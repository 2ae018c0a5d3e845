"""The sampling fields a request may leave out, their ranges, and the defaults it then gets: its
model's spec's (`sampling` in the desired state), else its model's own (generation_config.json, the
fields vLLM reads from it), else OpenAI's (1 for temperature and top_p, no top_k, min_p or
repetition penalty). The API's requests and the desired state share these ranges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = structlog.get_logger(__name__)

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]  # 0: the likeliest token
TopK = Annotated[int, Field(ge=-1)]  # 0 or -1: no top-k
MinP = Annotated[float, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=10)]


class SamplingDefaults(BaseModel):
    """Values for the sampling fields a request leaves out (None: this source sets none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None

    def over(self, under: SamplingDefaults) -> SamplingDefaults:
        """These, with `under`'s where these leave a field unset."""
        mine = self.model_dump(exclude_none=True)
        return under.model_copy(update=mine) if mine else under


def model_defaults(model_dir: Path) -> SamplingDefaults:
    """The sampling fields of the model's generation_config.json; one that is not a number in its
    range is left out, with a warning, the others kept (none without the file)."""
    path = model_dir / "generation_config.json"
    try:
        config: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return SamplingDefaults()
    except (OSError, ValueError) as exc:
        log.warning("generation_config_unreadable", path=str(path), error=str(exc))
        return SamplingDefaults()
    if not isinstance(config, dict):
        log.warning("generation_config_unreadable", path=str(path), error="not a JSON object")
        return SamplingDefaults()
    found: dict[str, Any] = {}
    for name in SamplingDefaults.model_fields:
        if config.get(name) is None:
            continue
        try:
            found |= SamplingDefaults.model_validate({name: config[name]}).model_dump(
                exclude_none=True
            )
        except ValidationError as exc:
            error = exc.errors()[0]["msg"]
            log.warning("generation_config_field_ignored", path=str(path), field=name, error=error)
    return SamplingDefaults(**found)
