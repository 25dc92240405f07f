#!/bin/sh
# locoswarm-join READY_FILE HOST [locoswarm run flags...]
#
# Entrypoint of the nodes that join another one in deploy/compose.yaml. The first node writes
# its ready file (--ready-file, one JSON line with peer_id and maddrs) onto a shared volume; this
# waits for that file, resolves HOST (the first node's service name) to an IP address, and runs
#   locoswarm run --join /ip4/<HOST's IP>/tcp/<its DHT port>/p2p/<its peer id> flags...
# The first node keeps its identity key in its volume, so its peer id survives restarts and an
# old ready file still names the right peer.
# JOIN_WAIT_S (default 300) bounds the wait.
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: locoswarm-join READY_FILE HOST [locoswarm run flags...]" >&2
    exit 2
fi
ready_file=$1
host=$2
shift 2

maddr=$(python3 - "$ready_file" "$host" "${JOIN_WAIT_S:-300}" <<'PY'
import json
import re
import socket
import sys
import time

path, host, wait_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + wait_s
while True:
    try:
        with open(path) as f:
            info = json.loads(f.read())
        ports = [m.group(1) for a in info["maddrs"] if (m := re.search(r"/tcp/(\d+)", a))]
        address = f"/ip4/{socket.gethostbyname(host)}/tcp/{ports[0]}/p2p/{info['peer_id']}"
        break
    except (OSError, ValueError, KeyError, IndexError) as exc:  # not there yet, or half written
        if time.monotonic() > deadline:
            sys.exit(f"locoswarm-join: no usable ready file {path} for {host} after {wait_s:.0f}s: {exc}")
        time.sleep(1)
print(address)
PY
)
echo "locoswarm-join: joining $host through $maddr" >&2
exec locoswarm run --join "$maddr" "$@"
