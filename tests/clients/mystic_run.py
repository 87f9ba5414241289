"""Runs Mystic's own SDK (``pipeline-ai``) against a jetrun gateway; prints what it got as JSON.

Run by the interpreter of a separate virtual environment (``pipeline-ai`` pins starlette and
pydantic versions jetrun cannot share): ``PIPELINE_API_URL`` and ``PIPELINE_API_TOKEN`` point
it at the gateway, ``PIPELINE_DIR`` at an empty config dir so no saved remote is used.
"""

from __future__ import annotations

import json

from pipeline.cloud.pipelines import run_pipeline, stream_pipeline


def state(run: object) -> str:
    value = run.state  # type: ignore[attr-defined]
    return str(getattr(value, "value", value))


result = run_pipeline("demo/echo:v1", "hi", 3)
updates = list(stream_pipeline("demo/stream:v1", 3))
print(
    json.dumps(
        {
            "id": result.id,
            "state": state(result),
            "outputs": result.outputs_formatted(),
            "stream_states": [state(update) for update in updates],
            "stream_outputs": [update.outputs_formatted() for update in updates],
        }
    )
)
