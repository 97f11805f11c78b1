"""A first look with real clients at every target: qemu-io writes, nbdinfo reads."""

import subprocess

from tests.conftest import Target, need


def test_qemu_io_pattern_round_trip(target: Target) -> None:
    need("qemu-io")
    out = subprocess.run(
        ["qemu-io", "-f", "raw", target.uri, "-c", "write -P 0x5a 4096 65536",
         "-c", "read -P 0x5a 4096 65536", "-c", "read -P 0 0 4096"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Pattern verification failed" not in out
