"""Shared by the auth tests: an auth file with a few principals, and their tokens."""

from __future__ import annotations

from pathlib import Path

import yaml  # type: ignore[import-untyped]

from tempomq.auth import hash_token

ADMIN_TOKEN = "tmq_admin-token-for-tests-0123456789"
OWNER_TOKEN = "tmq_owner-token-for-tests-0123456789"
NEIGHBOUR_TOKEN = "tmq_neighbour-token-for-tests-012345"
STRANGER_TOKEN = "tmq_stranger-token-for-tests-01234567"
WRONG_TOKEN = "tmq_nobody-has-this-token-0123456789"
OWNER_SECRET_KEY = "owner-secret-key"

#: ``owner`` runs the orders service: topic ``orders``, group ``billing``, producer group
#: ``shop``. ``neighbour`` shares the server: it may read ``orders`` but under its own group,
#: and owns topic ``other`` and producer group ``other``. ``stranger`` may touch nothing of
#: the orders service at all.
PRINCIPALS = {
    "ops": {"admin": True, "tokens_sha256": [hash_token(ADMIN_TOKEN)]},
    "owner": {
        "tokens_sha256": [hash_token(OWNER_TOKEN)],
        "access_key": "owner-ak",
        "secret_key": OWNER_SECRET_KEY,
        "allow": {
            "topic:orders": ["produce", "consume"],
            "group:billing": ["consume", "reset"],
            "producer_group:shop": ["check", "resolve"],
        },
    },
    "neighbour": {
        "tokens_sha256": [hash_token(NEIGHBOUR_TOKEN)],
        "allow": {
            "topic:orders": ["consume"],
            "topic:other*": ["produce", "consume"],
            "group:reporting": ["consume"],
            "producer_group:other": ["check", "resolve"],
        },
    },
    "stranger": {
        "tokens_sha256": [hash_token(STRANGER_TOKEN)],
        "allow": {"topic:other": ["produce", "consume"]},
    },
}


def write_auth_file(path: Path, principals: object = None) -> Path:
    path.write_text(yaml.safe_dump({"principals": principals or PRINCIPALS}))
    path.chmod(0o600)
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
