"""Advertise one worker until SIGTERM: NAME PORT MEMORY KEYHEX [INTERFACE ...].

Prints "ready" once the record is registered; on SIGTERM it unregisters and exits 0; a
name taken on the network prints the error and exits 2."""

import signal
import sys
import time

from mlxring.cluster.discovery import Advertiser
from mlxring.errors import UserError

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds the `with`: a goodbye record
name, port, memory, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    with Advertiser(name, port, memory, "mlx", "cpu", bytes.fromhex(key), sys.argv[5:] or None):
        print("ready", flush=True)
        while True:
            time.sleep(3600)
except UserError as e:
    print(f"error: {e}", flush=True)
    sys.exit(2)
