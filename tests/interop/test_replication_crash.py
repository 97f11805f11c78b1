"""Replication across crashes: SIGKILL the source, the remote device, or both, under load.

Writes and triggers run against device A while it replicates to device B; one or
both are killed at a random moment and restarted.  Once the link has caught up,
B's LU must equal A's, and for every trigger with a generation on both sides the
two generations must be equal byte for byte (invariant 6 across crashes).  A
trigger answered as replicated before a crash is never lost on the way to B, and
once the link has caught up, triggers are replicated again.
MIRRORPOOL_CRASH_SEED picks the moments.

A trigger made on A while it replays its journal after its own crash is answered
as not replicated (the replay has not yet caught up), and a trigger A split at the
moment it was killed may never have been answered nor reached B: neither has a
generation on B, which is why each cycle ends with a trigger of its own.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time

import nbd
import pytest

from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    MiB,
    api,
    api_trigger,
    assert_identical,
    assert_same_cut,
    close,
    wait_caught_up,
)

SIZE = 16 * MiB
CYCLES = ("source", "remote", "both", "source")


def _load(a: DeviceProcess, rng: random.Random, stop: threading.Event,
          counts: dict[str, int], replicated: set[str]) -> None:
    """Random 4 KiB writes (FUA now and then) and triggers, until stopped or A dies.

    ``replicated`` gets the id of every trigger answered as replicated.
    """
    h = nbd.NBD()
    try:
        h.connect_uri(a.uri("x"))
        n = 0
        while not stop.is_set():
            n += 1
            block = n.to_bytes(8, "little") * 512
            h.pwrite(block, rng.randrange(SIZE // 4096) * 4096,
                     nbd.CMD_FLAG_FUA if n % 16 == 0 else 0)
            counts["writes"] += 1
            if n % 40 == 0:
                status, body = a.request("POST", "/v1/lus/x/trigger", {"label": f"n{n}"})
                counts["triggers"] += status == 200
                if status == 200:
                    (gen,) = body["generations"]  # type: ignore[index]
                    if gen.get("replicated"):
                        replicated.add(gen["trigger_id"])
    except (nbd.Error, OSError, http.client.HTTPException):
        pass  # the device was killed (mid-answer, too)
    finally:
        close(h)


@pytest.mark.timeout(600)
def test_same_cut_on_both_devices_across_crashes(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    seed = int(os.environ.get("MIRRORPOOL_CRASH_SEED") or random.randrange(1 << 31))
    rng = random.Random(seed)
    print(f"seed {seed}")
    api(a, "POST", "/v1/lus", {"name": "x", "size": SIZE, "pool": 3}, expect=201)
    a.cli("remote", "add", "x", "--device", b.api, "--remote-pool", "3")
    wait_caught_up(a, "x", 60)
    replicated: set[str] = set()
    for cycle, victim in enumerate(CYCLES):
        counts = {"writes": 0, "triggers": 0}
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(a, rng, stop, counts, replicated))
        loader.start()
        time.sleep(rng.uniform(0.3, 1.2))
        if victim in ("remote", "both"):
            b.stop(signal.SIGKILL)
        if victim in ("source", "both"):
            a.stop(signal.SIGKILL)
        else:
            time.sleep(rng.uniform(0.1, 0.5))  # A goes on while B is down
        stop.set()
        loader.join(30)
        if victim in ("source", "both"):
            a.start()
        if victim in ("remote", "both"):
            b.start()
        answer = api_trigger(a, "x", f"after-{cycle}")  # the stream goes on after restarts
        wait_caught_up(a, "x", 120)
        settled = api_trigger(a, "x", f"settled-{cycle}")
        assert settled["replicated"], "a trigger after the link caught up was not replicated"
        status = wait_caught_up(a, "x", 120)
        print(f"cycle {cycle} ({victim}): {counts}, link {status['state']}, "
              f"last remote trigger {status['last_remote_trigger']}")
        assert_identical(a.uri("x"), b.uri("x"))
        assert assert_same_cut(a, b, "x") >= 1
        rows = {r["trigger_id"]: r for r in api(a, "GET", "/v1/lus/x/remote/backups")}
        assert rows[settled["trigger_id"]]["remote_gen"] is not None
        assert rows[answer["trigger_id"]]["remote_gen"] is not None or not answer["replicated"]
        lost = [r for tid, r in rows.items()
                if tid in replicated and r["gen"] is not None and r["remote_gen"] is None]
        assert not lost, f"triggers answered as replicated never reached B: {lost}"
