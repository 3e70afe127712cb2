"""docs/openapi.yaml and the routes of the real app describe the same API, route for route."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tempomq.app import OPENAPI_PATH, build_app
from tempomq.config import Settings

HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "options", "head", "trace"})
Route = tuple[str, str]


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with OPENAPI_PATH.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


def spec_routes(spec: dict[str, Any]) -> set[Route]:
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def app_routes(app: web.Application) -> set[Route]:
    found = set()
    for route in app.router.routes():
        # HEAD is added for every GET; static files and CORS preflights are not API routes.
        if route.method in ("HEAD", "OPTIONS", "*"):
            continue
        if route.resource is None or isinstance(route.resource, web.StaticResource):
            continue
        found.add((route.method, route.resource.canonical))
    return found


def test_every_route_is_documented_and_every_documented_route_exists(
    spec: dict[str, Any], tmp_data_dir: Path
) -> None:
    routes = app_routes(build_app(Settings(data_dir=tmp_data_dir)))
    documented = spec_routes(spec)
    assert sorted(routes - documented) == [], "routes missing from docs/openapi.yaml"
    assert sorted(documented - routes) == [], "documented in docs/openapi.yaml but not routed"


def test_spec_is_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    for ref in _refs(spec):
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            assert part in node, f"unresolved $ref {ref}"
            node = node[part]


def _param_names(spec: dict[str, Any], params: list[dict[str, Any]]) -> set[str]:
    names = set()
    for param in params:
        if "$ref" in param:
            param = spec["components"]["parameters"][param["$ref"].rsplit("/", 1)[1]]
        if param["in"] == "path":
            names.add(param["name"])
    return names


def test_path_parameters_are_declared(spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        in_template = set(re.findall(r"{(\w+)}", path))
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            declared = _param_names(spec, item.get("parameters", []) + op.get("parameters", []))
            assert declared == in_template, f"{method.upper()} {path}"


def test_every_operation_has_a_unique_id_and_responses(spec: dict[str, Any]) -> None:
    ids = []
    for item in spec["paths"].values():
        for method, op in item.items():
            if method in HTTP_METHODS:
                ids.append(op["operationId"])
                assert op["responses"]
    assert len(ids) == len(set(ids))


def test_the_spec_says_which_operations_need_credentials(spec: dict[str, Any]) -> None:
    """docs/openapi.yaml and the permission table (tempomq/auth/routes.py) agree on which
    operations are public, and every other one documents 401, 403 and 429."""
    from tempomq.auth.routes import ROUTES

    assert {"bearerAuth", "mutualTLS"} <= set(spec["components"]["securitySchemes"])
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            rule = ROUTES[(method.upper(), path)]
            if rule.public:
                assert op.get("security") == [], f"{method.upper()} {path} is public"
            else:
                assert "security" not in op, f"{method.upper()} {path} needs credentials"
                assert {"401", "403", "429"} <= set(op["responses"]), f"{method.upper()} {path}"
