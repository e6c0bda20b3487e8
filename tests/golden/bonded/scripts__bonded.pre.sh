#!/bin/bash
# corral: pre-install script for bonded, from profiles base
set -u
CORRAL_NODE=bonded
CORRAL_EVENTS_URL=http://10.0.0.1:8080/api/v1/nodes/bonded/events
CORRAL_TOKEN=
corral_report() {
  curl -fsS -m 10 -X POST -H "Authorization: Bearer $CORRAL_TOKEN" \
    -H "Content-Type: application/json" \
    --data "{\"phase\": \"$1\", \"message\": \"${2:-}\"}" \
    "$CORRAL_EVENTS_URL" >/dev/null 2>&1 || true
}
corral_report pre-install

# --- profile base ---
echo pre for bonded
