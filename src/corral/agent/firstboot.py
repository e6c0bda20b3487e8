"""The installed system's first word: a systemd unit that tells corral the node is up.

The ramdisk's ``done`` only says that the image is on the disk. Whether the node boots it
(firmware boot order, GRUB, the kernel finding its root, systemd reaching multi-user) is
proven by the installed system alone, so the agent leaves it a oneshot unit ordered after
``multi-user.target``. The unit posts the ``first-boot`` event with the node's install
token, retrying with backoff while the network comes up, then deletes the token: its
``ConditionPathExists`` keeps it from ever running again, and corral accepts that token
for one ``first-boot`` only. ``curl`` is used when the image has it; without it, bash's
``/dev/tcp`` speaks the few lines of HTTP/1.0 needed, so a minimal image can call back too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from corral.agent.identity import write_atomic

log = logging.getLogger("corral.agent")

UNIT_NAME = "corral-first-boot.service"
TOKEN = "etc/corral/node-token"
ENV = "etc/corral/first-boot.env"
SCRIPT = "usr/lib/corral/first-boot"
UNIT = f"etc/systemd/system/{UNIT_NAME}"
WANTS = f"etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"

UNIT_TEXT = f"""\
# Written by corral's installer: tells corral that this node's installed system is up.
[Unit]
Description=Report the first boot of this node's installed system to corral
Wants=network-online.target
After=network-online.target multi-user.target
ConditionPathExists=/{TOKEN}

[Service]
Type=oneshot
ExecStart=/{SCRIPT}
TimeoutStartSec=15min

[Install]
WantedBy=multi-user.target
"""

SCRIPT_TEXT = f"""\
#!/bin/bash
# Written by corral's installer: posts this node's first-boot event to corral with its
# install token, then deletes the token (the unit runs while the token exists).
set -u
. /{ENV}
token=$(tr -d ' \\n' < /{TOKEN})
path="/api/v1/nodes/$CORRAL_NODE/events"
uptime=$(cut -d' ' -f1 /proc/uptime)
phase=${{CORRAL_PHASE:-first-boot}}
message="$(hostname) runs ${{CORRAL_WHAT:-its installed system}}: kernel $(uname -r), up $uptime s"
body="{{\\"phase\\": \\"$phase\\", \\"message\\": \\"$message\\"}}"

post() {{
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -m 15 -o /dev/null -H "Authorization: Bearer $token" \\
            -H 'Content-Type: application/json' --data "$body" "$CORRAL_SERVER$path"
        return
    fi
    # No curl in the image: HTTP/1.0 over bash's /dev/tcp.
    local hostport=${{CORRAL_SERVER#http://}}
    hostport=${{hostport%%/*}}
    local host=${{hostport%:*}} port=80 status=""
    [[ $hostport == *:* ]] && port=${{hostport##*:}}
    exec 3<>"/dev/tcp/$host/$port" || return 1
    printf 'POST %s HTTP/1.0\\r\\nHost: %s\\r\\nAuthorization: Bearer %s\\r\\n' \\
        "$path" "$hostport" "$token" >&3
    printf 'Content-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s' \\
        "${{#body}}" "$body" >&3
    read -r -t 15 _ status _ <&3
    exec 3<&-
    [[ $status == 2* ]] || {{ echo "corral answered ${{status:-nothing}}" >&2; return 1; }}
}}

delay=2
for attempt in $(seq 1 30); do
    if post; then
        rm -f /{TOKEN}
        echo "corral-first-boot: reported to $CORRAL_SERVER"
        exit 0
    fi
    echo "corral-first-boot: attempt $attempt failed; again in $delay s" >&2
    sleep "$delay"
    delay=$(( delay < 30 ? delay * 2 : 30 ))
done
exit 1
"""


def has_systemd(root: Path) -> bool:
    return (
        any((root / d / "systemd").is_dir() for d in ("usr/lib", "lib")) and (root / "etc").is_dir()
    )


def install(
    root: Path,
    server: str,
    node: str,
    token: str,
    *,
    phase: str = "first-boot",
    what: str = "its installed system",
) -> list[str]:
    """Leave the first-boot unit, its script and the token in the installed ``root``;
    the paths written (relative). A diskless system posts ``phase`` ``running`` instead,
    saying ``what`` it runs."""
    write_atomic(root / TOKEN, token + "\n", 0o600)
    env = f"CORRAL_SERVER={server}\nCORRAL_NODE={node}\nCORRAL_PHASE={phase}\n"
    env += f"CORRAL_WHAT='{what}'\n"
    write_atomic(root / ENV, env, 0o644)
    write_atomic(root / SCRIPT, SCRIPT_TEXT, 0o755)
    write_atomic(root / UNIT, UNIT_TEXT, 0o644)
    wants = root / WANTS
    wants.parent.mkdir(parents=True, exist_ok=True)
    if wants.is_symlink() or wants.exists():
        wants.unlink()
    os.symlink(f"/{UNIT}", wants)
    log.info("first-boot unit installed: the installed system reports to %s", server)
    return [TOKEN, ENV, SCRIPT, UNIT, WANTS]
