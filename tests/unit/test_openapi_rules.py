"""docs/openapi.yaml states the same input rules the server applies: fields, ranges, names."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from broker_core.fields import REQUEST_FIELDS
from broker_core.groups import MAX_ATTEMPTS, RECEIPT_PATTERN
from broker_core.http import (
    MAX_BATCH,
    MAX_DELAY_MS,
    MAX_INVISIBLE_MS,
    MAX_TIMESTAMP_MS,
    MAX_WAIT_MS,
    MIN_DELIVER_AT_MS,
)
from broker_core.message import (
    CLIENT_NAME_PATTERN,
    MAX_KEY_LEN,
    MAX_KEYS,
    MAX_TAGS_LEN,
    TOPIC_PATTERN,
)
from tempomq.app import OPENAPI_PATH
from txcoord.http import MAX_IMMUNITY_MS


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    with OPENAPI_PATH.open(encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.safe_load(f)
    return spec["components"]["schemas"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(REQUEST_FIELDS))
def test_each_request_body_has_the_servers_fields_and_no_others(
    schemas: dict[str, Any], name: str
) -> None:
    schema = schemas[name]
    assert set(schema["properties"]) == REQUEST_FIELDS[name]
    assert schema["additionalProperties"] is False


def prop(schemas: dict[str, Any], schema: str, field: str) -> dict[str, Any]:
    """A property's schema, following one ``$ref``."""
    found: dict[str, Any] = schemas[schema]["properties"][field]
    ref = found.get("$ref")
    return schemas[ref.rsplit("/", 1)[1]] if ref else found  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("schema", "field", "key", "value"),
    [
        ("MessageIn", "delay_ms", "maximum", MAX_DELAY_MS),
        ("MessageIn", "deliver_at", "minimum", MIN_DELIVER_AT_MS),
        ("MessageIn", "tags", "maxLength", MAX_TAGS_LEN),
        ("MessageIn", "keys", "maxItems", MAX_KEYS),
        ("MessageIn", "sharding_key", "maxLength", MAX_KEY_LEN),
        ("MessageBatch", "messages", "maxItems", MAX_BATCH),
        ("DelayedPatch", "delay_ms", "maximum", MAX_DELAY_MS),
        ("DelayedPatch", "deliver_at", "minimum", MIN_DELIVER_AT_MS),
        ("NackRequest", "retry_after_ms", "maximum", MAX_DELAY_MS),
        ("ReceiveRequest", "invisible_ms", "maximum", MAX_INVISIBLE_MS),
        ("ChangeInvisibleRequest", "invisible_ms", "maximum", MAX_INVISIBLE_MS),
        ("ReceiveRequest", "wait_ms", "maximum", MAX_WAIT_MS),
        ("ReceiveRequest", "max_messages", "maximum", MAX_BATCH),
        ("ResetRequest", "timestamp", "maximum", MAX_TIMESTAMP_MS),
        ("GroupCreate", "max_attempts", "maximum", MAX_ATTEMPTS),
        ("TransactionCreate", "check_immunity_ms", "maximum", MAX_IMMUNITY_MS),
    ],
)
def test_limits_are_the_servers(
    schemas: dict[str, Any], schema: str, field: str, key: str, value: int
) -> None:
    assert prop(schemas, schema, field)[key] == value


def test_key_length_is_the_servers(schemas: dict[str, Any]) -> None:
    assert prop(schemas, "MessageIn", "keys")["items"]["maxLength"] == MAX_KEY_LEN


def test_names_follow_the_servers_patterns(schemas: dict[str, Any]) -> None:
    assert schemas["TopicName"]["pattern"] == TOPIC_PATTERN
    assert schemas["ClientTopicName"]["pattern"] == CLIENT_NAME_PATTERN
    assert schemas["GroupName"]["pattern"] == CLIENT_NAME_PATTERN
    assert schemas["Receipt"]["pattern"] == RECEIPT_PATTERN
    assert prop(schemas, "TopicCreate", "name") == schemas["ClientTopicName"]
    assert prop(schemas, "GroupCreate", "name") == schemas["GroupName"]
    assert prop(schemas, "TransactionCreate", "producer_group") == schemas["GroupName"]
