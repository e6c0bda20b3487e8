#!/bin/bash
# corral: post-install script for c01, from profiles base, compute
set -u
CORRAL_NODE=c01
CORRAL_EVENTS_URL=http://10.0.0.1:8080/api/v1/nodes/c01/events
CORRAL_TOKEN=
corral_report() {
  curl -fsS -m 10 -X POST -H "Authorization: Bearer $CORRAL_TOKEN" \
    -H "Content-Type: application/json" \
    --data "{\"phase\": \"$1\", \"message\": \"${2:-}\"}" \
    "$CORRAL_EVENTS_URL" >/dev/null 2>&1 || true
}
corral_report post-install

# --- profile base ---
echo post for c01 in hall-a

# --- profile compute ---
systemctl enable slurmd
