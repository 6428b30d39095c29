"""A private OpenSSH server on 127.0.0.1 with throwaway keys, for testing `launch` over ssh."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.ringutil import free_port, kill_group

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> bool:
    """OpenSSH is installed and this user may start a private sshd (root, here)."""
    return Path(SSHD).exists() and shutil.which("ssh") is not None and os.geteuid() == 0


class PrivateSshd:
    """`sshd -D` on a free loopback port; `ssh_command` logs in with the throwaway key."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.key = root / "id_ed25519"
        host_key = root / "host_ed25519"
        for path in (self.key, host_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True
            )
        (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
        config = root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nPidFile {root}/sshd.pid\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin yes\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while subprocess.run(
            [*self.ssh_command().split(), "root@127.0.0.1", "true"], capture_output=True
        ).returncode:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the private sshd did not start")
            time.sleep(0.2)

    def ssh_command(self) -> str:
        return (
            f"ssh -p {self.port} -i {self.key} -o BatchMode=yes -o LogLevel=ERROR "
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        )

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait()
