#!/usr/bin/env bash
# The README's curl walk-through, runnable: create a topic, send, receive, ack, look up.
# Usage: docs/walkthrough.sh [BASE_URL]   (default http://127.0.0.1:8080, a running `make run`)
set -euo pipefail
BASE="${1:-http://127.0.0.1:8080}"
TOPIC="${TOPIC:-orders}"
PY="${PYTHON:-python3}"

say() { printf '\n$ %s\n' "$*"; }
json_get() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

say "create topic $TOPIC"
# A second run finds the topic there (409 topic_exists) and goes on with it.
created=$(curl -s -w '\n%{http_code}' -X POST "$BASE/v1/topics" \
     -d "{\"name\": \"$TOPIC\", \"queues\": 4}")
echo "${created%$'\n'*}"
case "${created##*$'\n'}" in
    201|409) ;;
    *) exit 1 ;;
esac

say "send one message and a batch"
curl -sf -X POST "$BASE/v1/topics/$TOPIC/messages" \
     -d '{"body": "order 17 created", "tags": "created", "keys": ["order-17"]}'
curl -sf -X POST "$BASE/v1/topics/$TOPIC/messages" \
     -d '{"messages": [{"body": "order 18 created"}, {"body": "order 19 created"}]}'

say "receive"
received=$(curl -sf -X POST "$BASE/v1/topics/$TOPIC/groups/billing/receive" \
     -d '{"max_messages": 32, "wait_ms": 2000}')
echo "$received"
receipts=$(echo "$received" | json_get 'json.dumps([m["receipt"] for m in d["messages"]])')

say "ack"
curl -sf -X POST "$BASE/v1/topics/$TOPIC/groups/billing/ack" -d "{\"receipts\": $receipts}"

say "group lag"
curl -sf "$BASE/v1/topics/$TOPIC/groups/billing"

say "find by key"
curl -sf "$BASE/v1/topics/$TOPIC/messages?key=order-17"

say "delayed: send, look up, move, cancel"
delayed=$(curl -sf -X POST "$BASE/v1/topics/$TOPIC/messages" \
     -d '{"body": "cancel order 17 if unpaid", "delay_ms": 1800000}')
echo "$delayed"
id=$(echo "$delayed" | json_get 'd["msg_id"]')
curl -sf "$BASE/v1/delayed/$id"
curl -sf -X PATCH "$BASE/v1/delayed/$id" -d '{"delay_ms": 5000}'
curl -sf -X DELETE "$BASE/v1/delayed/$id"
echo
