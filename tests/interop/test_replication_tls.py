"""A replication link over TLS, authenticated by client certificates.

Device B requires TLS and a client certificate signed by its CA; device A's link
presents one.  Links without a certificate, or with one from another CA, are
refused in one sentence and leave nothing behind on B.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.processes import DeviceProcess
from tests.helpers.tls import make_certificates
from tests.mirror_support import (
    MiB,
    api,
    api_trigger,
    qemu_io,
    read_export,
    remote_gens,
    wait_caught_up,
)

SIZE = 8 * MiB


def test_link_over_tls_with_client_certificates(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    good = certs.good
    b_args = ["--tls", "require", "--tls-cert", str(good / "server-cert.pem"),
              "--tls-key", str(good / "server-key.pem"), "--tls-ca", str(good / "ca-cert.pem")]
    a = DeviceProcess(data_dir=tmp_path / "a").start()
    b = DeviceProcess(data_dir=tmp_path / "b", extra_args=b_args).start()
    try:
        api(a, "POST", "/v1/lus", {"name": "t", "size": SIZE, "pool": 2}, expect=201)
        add = ["remote", "add", "t", "--device", b.api, "--remote-pool", "2"]
        ca = ["--tls-ca", str(good / "ca-cert.pem")]
        for extra, why in [
            ([], "plain text"),
            (ca, "no client certificate"),
            (ca + ["--tls-cert", str(certs.rogue_client / "client-cert.pem"),
                   "--tls-key", str(certs.rogue_client / "client-key.pem")], "another CA"),
        ]:
            result = a.cli(*add, *extra, check=False)
            assert result.returncode == 1, why
            assert "refused the replication link" in result.stderr, (why, result.stderr)
            assert "Traceback" not in result.stderr
            # nothing half-done: no LU left on B, no link on A
            assert b.request("GET", "/v1/lus/t")[0] == 404, why
            assert api(a, "GET", "/v1/remotes") == []
        a.cli(*add, *ca, "--tls-cert", str(good / "client-cert.pem"),
              "--tls-key", str(good / "client-key.pem"))
        wait_caught_up(a, "t")
        qemu_io(a.uri("t"), "write -P 0x71 0 1M")
        gen = api_trigger(a, "t", "over-tls")["gen"]
        qemu_io(a.uri("t"), "write -P 0x72 0 64k")
        status = wait_caught_up(a, "t")
        assert status["nbd"].startswith("nbds://")
        (row,) = [r for r in remote_gens(a, "t") if r["label"] == "over-tls"]
        secure = f"?tls-certificates={good}"
        b_base = f"nbds://127.0.0.1:{b.nbd_port}"
        assert read_export(f"{b_base}/t@{row['remote_gen']}{secure}") == \
            read_export(a.uri(f"t@{gen}"))
        assert read_export(f"{b_base}/t{secure}") == read_export(a.uri("t"))
    finally:
        for dev in (a, b):
            if dev.proc is not None and dev.proc.poll() is None:
                dev.stop()
