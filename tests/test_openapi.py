"""The OpenAPI document matches the gateway: every route is in it and nothing else, and live
answers of a real gateway validate against its schemas."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema
import pytest
from nats.aio.client import Client

from runtime.control import openapi
from runtime.control.gateway import Gateway
from runtime.infra.config import demo_config
from tests.harness import Stack, client, wait_state

CONVERTER = re.compile(r"\{(\w+):\w+\}")


def app_routes() -> set[tuple[str, str]]:
    app = Gateway(Client(), demo_config()).app()
    found = set()
    for route in app.routes:
        path = CONVERTER.sub(r"{\1}", route.path)  # type: ignore[attr-defined]
        for method in route.methods - {"HEAD"}:  # type: ignore[attr-defined]
            found.add((method.lower(), path))
    return found


def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    documented = {(op.method, op.path) for op in openapi.OPERATIONS}
    routes = app_routes()
    assert routes - documented == set(), "add these routes to runtime/control/openapi.py OPERATIONS"
    assert documented - routes == set(), "these operations have no route in the gateway"
    doc_paths = openapi.document()["paths"]
    assert {(m, p) for p, ms in doc_paths.items() for m in ms} == routes


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if "$ref" in node else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def test_every_reference_resolves_and_path_parameters_are_declared() -> None:
    doc = openapi.document()
    schemas = doc["components"]["schemas"]
    assert {r.rsplit("/", 1)[1] for r in refs(doc)} <= set(schemas)
    for path, methods in doc["paths"].items():
        for op in methods.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), path
    jsonschema.Draft202012Validator.check_schema({"$defs": schemas})


def validator(doc: dict[str, Any], method: str, path: str, status: int) -> Any:
    content = doc["paths"][path][method]["responses"][str(status)]["content"]
    schema = next(iter(content.values()))["schema"]
    root = {**schema, "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.anyio
async def test_live_answers_validate_against_the_served_document(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as anon:
        served = await anon.get("/openapi.json")
        assert served.status_code == 200
        doc = served.json()
        assert doc == openapi.document()
        page = await anon.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/openapi.json" in page.text and "https://" not in page.text
        unauthorized = await anon.get("/v4/runs")
        validator(doc, "get", "/v4/runs", 401).validate(unauthorized.json())
    async with client(stack, "tok_acme") as acme:
        body = {
            "pipeline": "demo/echo:v1",
            "inputs": [{"type": "string", "value": "x"}, {"type": "integer", "value": 2}],
        }
        done = await acme.post("/v4/runs", json=body)
        assert done.status_code == 200
        validator(doc, "post", "/v4/runs", 200).validate(done.json())
        queued = await acme.post("/v4/runs", json={**body, "async_run": True})
        validator(doc, "post", "/v4/runs", 202).validate(queued.json())
        await wait_state(acme, queued.json()["id"], {"completed"})
        listed = await acme.get("/v4/runs", params={"limit": 1})
        validator(doc, "get", "/v4/runs", 200).validate(listed.json())
        bad = await acme.post("/v4/runs", json={"pipeline": 3})
        assert bad.status_code == 422
        validator(doc, "post", "/v4/runs", 422).validate(bad.json())
        scaling = await acme.get("/v4/pipelines/demo/echo:v1/scaling")
        validator(doc, "get", "/v4/pipelines/{pointer}/scaling", 200).validate(scaling.json())
        with pytest.raises(jsonschema.ValidationError):  # the validator can fail
            validator(doc, "get", "/v4/runs", 200).validate(done.json())
