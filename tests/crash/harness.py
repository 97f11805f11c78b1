"""Crash-test harness: concurrent writes and triggers, SIGKILL, restart, check what survived.

One harness owns one device process (``DeviceProcess``, loopback only, stopped by
PID) and one LU.  A *cycle* is:

1. load: ``writers`` threads, each with its own NBD connection, write 4 KiB blocks
   that encode (cycle, writer, counter, slot) and a checksum, at random slots of a
   range of their own (disjoint) or of a shared range (overlapping writers); some
   with FUA, some followed by FLUSH.  ``trigger_threads`` threads fire triggers
   every few ms, rotating over the control API, the ``NAME:trigger`` path, the
   in-band TRIGGER command and the ``.trigger`` LU.  Every request is logged with
   its send time and its answer time (``time.monotonic``, taken just before the
   request is sent and just after its reply arrived, so both are conservative);
2. SIGKILL of the device (``os.kill`` of its PID) at a random moment, sometimes
   within the first few triggers;
3. restart on the same data directory, timed to serving and to in-sync;
4. checks, counting violations instead of stopping at the first:

   (a) durability: every write acknowledged with FUA, or acknowledged before a
       FLUSH that was itself acknowledged (on any connection: the device
       advertises multi-conn), is on the primary: its slot holds that write or one
       not known to precede it (for a writer's own range: the same or a later
       counter);
   (b) prefix consistency: every acknowledged trigger's generation exists after
       the restart (unless a later split recycled it: the pool member the answer
       named is now the active backup, holds a newer generation, or was named by a
       later answer) with the seq it
       was answered with, and each of its slots holds a write that is not older
       than the last write acknowledged before the trigger was sent and was not
       sent after the trigger was answered; generations of unanswered triggers that
       survived are checked the same way without the upper bound;
   (c) mirror equality: once the active backup is in sync, a new generation made
       with no write in flight equals the primary byte for byte;
   (d) generations are never altered: every generation listed after the previous
       restart (hashed then) that is still listed is unchanged, and so is a
       pinned "canary" generation made at set-up and checked on every cycle.

   Every block read anywhere must be all zeros or a valid block for its own slot
   (no torn, misplaced or unknown blocks).

The primary as read after a restart is the baseline of the next cycle: a slot's
baseline acts as a write acknowledged before the cycle began.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import random
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mirrorpool.mirror.changes import CHUNK  # the device's tracking and resync unit
from mirrorpool.nbd.client import NbdClient, NbdError
from tests.helpers.processes import DeviceProcess

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4096
MAGIC = b"MPCRASH1"
HEAD = struct.Struct(">8sIHHQQ")  # magic, cycle, writer, 0, counter, slot: 32 bytes
SUM_AT = BLOCK - 32
ZERO_BLOCK = bytes(BLOCK)
READ_STEP = 4 * MiB
NEG_INF = float("-inf")
CANARY_WRITER = 0xFFFF
TORN = "torn"
EXAMPLES_KEPT = 20  # per kind of violation

Ident = tuple[int, int, int]  # (cycle, writer, counter)


# ---------------------------------------------------------------- blocks


def make_block(cycle: int, writer: int, counter: int, slot: int) -> bytes:
    head = HEAD.pack(MAGIC, cycle, writer, 0, counter, slot)
    fill = hashlib.blake2b(head, digest_size=32).digest() * ((SUM_AT - HEAD.size) // 32)
    body = head + fill
    return body + hashlib.blake2b(body, digest_size=32).digest()


def parse_block(block: bytes, slot: int) -> Ident | None | str:
    """None for all zeros, the write's identity for a valid block of this slot, else why not."""
    if block == ZERO_BLOCK:
        return None
    if block[:8] != MAGIC:
        return TORN
    if hashlib.blake2b(block[:SUM_AT], digest_size=32).digest() != block[SUM_AT:]:
        return TORN
    _, cycle, writer, _, counter, at = HEAD.unpack(block[: HEAD.size])
    if at != slot:
        return f"misplaced (written for slot {at})"
    return (cycle, writer, counter)


def scan(image: bytearray, ref: bytearray | None = None,
         ref_idents: list | None = None) -> list:
    """Identity of every slot of an image; blocks equal to ``ref`` reuse its identities."""
    out: list = []
    for slot in range(len(image) // BLOCK):
        o = slot * BLOCK
        block = bytes(image[o : o + BLOCK])
        if ref is not None and ref_idents is not None and block == ref[o : o + BLOCK]:
            out.append(ref_idents[slot])
        else:
            out.append(parse_block(block, slot))
    return out


# ---------------------------------------------------------------- logs


@dataclass(slots=True, eq=False)
class Write:
    ident: Ident | None  # None: the all-zero baseline
    slot: int
    send: float
    ack: float | None = None
    fua: bool = False

    def precedes(self, other: Write) -> bool:
        """Known to have completed before ``other`` was sent."""
        return self is not other and self.ack is not None and self.ack < other.send


@dataclass(slots=True)
class Flush:
    send: float
    ack: float | None = None


@dataclass(slots=True)
class TriggerRec:
    label: str
    mechanism: str
    send: float
    answer: float | None = None
    gen: int | None = None
    seq: int | None = None
    member: int | None = None  # the pool member the answer said holds the generation
    refused: str | None = None
    error: str | None = None


@dataclass
class HarnessConfig:
    size: int = 64 * MiB
    pool: int = 6
    writers: int = 4
    shared_slots: int = 2048  # slots [0, shared) are written by every writer
    shared_fraction: float = 0.25
    fua_rate: float = 0.08
    flush_rate: float = 0.04
    trigger_threads: int = 2
    trigger_pause: tuple[float, float] = (0.001, 0.005)
    mechanisms: tuple[str, ...] = ("api", "path", "in-band", "trigger-lu")
    load_seconds: tuple[float, float] = (0.4, 1.2)
    early_kill_fraction: float = 0.2  # cycles killed within the first few triggers
    early_kill_seconds: tuple[float, float] = (0.0, 0.03)
    canary: bool = True  # a pinned generation, checked on every cycle
    in_sync_timeout: float = 120.0
    io_timeout: float = 30.0
    seed: int | None = None
    workers: int | None = None  # --workers of the device
    crash: bool = True  # False: stop the load and check without a crash (calibration)
    snapshot: bool = False  # copy the data directory after each kill (for post-mortems)


@dataclass
class CycleResult:
    cycle: int
    load_s: float
    writes_sent: int = 0
    writes_acked: int = 0
    durable_checked: int = 0
    acked_checked: int = 0
    triggers_sent: int = 0
    triggers_acked: int = 0
    triggers_refused: int = 0
    gens_prefix_checked: int = 0
    gens_unacked_checked: int = 0
    gens_hash_checked: int = 0
    acked_gens_recycled: int = 0
    restart_to_serving_s: float = 0.0
    restart_to_in_sync_s: float | None = None
    bytes_to_resync: int | None = None
    violations: int = 0

    def line(self) -> str:
        insync = ("timeout" if self.restart_to_in_sync_s is None
                  else f"{self.restart_to_in_sync_s:.2f}s")
        resync = "?" if self.bytes_to_resync is None else f"{self.bytes_to_resync / MiB:.2f}MiB"
        return (
            f"cycle {self.cycle}: load {self.load_s:.2f}s writes {self.writes_sent} "
            f"(acked {self.writes_acked}, durable checked {self.durable_checked}) "
            f"triggers {self.triggers_sent} (acked {self.triggers_acked}, refused "
            f"{self.triggers_refused}) gens prefix {self.gens_prefix_checked}+"
            f"{self.gens_unacked_checked} unacked, hash {self.gens_hash_checked}, recycled "
            f"{self.acked_gens_recycled}; serving {self.restart_to_serving_s:.2f}s in-sync "
            f"{insync} resync {resync}; violations {self.violations}"
        )


@dataclass
class Report:
    cycles: int = 0
    writes_sent: int = 0
    writes_acked: int = 0
    durable_checked: int = 0
    acked_checked: int = 0
    acked_nondurable_lost: int = 0  # informational: SIGKILL keeps the page cache
    slots_checked: int = 0
    triggers_sent: int = 0
    triggers_acked: int = 0
    triggers_refused: int = 0
    gens_prefix_checked: int = 0
    gens_unacked_checked: int = 0
    gens_hash_checked: int = 0
    acked_gens_recycled: int = 0
    equality_checks: int = 0
    violations: Counter = field(default_factory=Counter)
    anomalies: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    resync_bytes: list[int] = field(default_factory=list)
    to_serving: list[float] = field(default_factory=list)
    to_in_sync: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_violations(self) -> int:
        return sum(self.violations.values())

    def summary(self) -> str:
        def stat(values: list[float], unit: str, scale: float = 1.0) -> str:
            if not values:
                return "n/a"
            v = sorted(values)
            return (f"median {v[len(v) // 2] / scale:.2f}{unit} max {v[-1] / scale:.2f}{unit}")

        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.violations.items())) or "none"
        odd = ", ".join(f"{k}={n}" for k, n in sorted(self.anomalies.items())) or "none"
        return (
            f"cycles={self.cycles} writes_sent={self.writes_sent} "
            f"writes_acked={self.writes_acked} durable_writes_checked={self.durable_checked} "
            f"acked_writes_checked={self.acked_checked} slots_checked={self.slots_checked} "
            f"triggers_sent={self.triggers_sent} triggers_acked={self.triggers_acked} "
            f"triggers_refused={self.triggers_refused} "
            f"generations_prefix_checked={self.gens_prefix_checked} "
            f"generations_unacked_checked={self.gens_unacked_checked} "
            f"generations_hash_checked={self.gens_hash_checked} "
            f"acked_generations_recycled={self.acked_gens_recycled} "
            f"equality_checks={self.equality_checks} "
            f"violations={self.total_violations} ({kinds}) anomalies=({odd}) "
            f"acked_nondurable_lost={self.acked_nondurable_lost} "
            f"resync_at_start={stat([float(b) for b in self.resync_bytes], 'MiB', MiB)} "
            f"restart_to_serving={stat(self.to_serving, 's')} "
            f"restart_to_in_sync={stat(self.to_in_sync, 's')} "
            f"runtime={self.seconds:.1f}s"
        )


class HarnessError(Exception):
    """The harness itself could not go on (the device would not start, ...)."""


# ---------------------------------------------------------------- the harness


class CrashHarness:
    def __init__(self, work_dir: Path, config: HarnessConfig | None = None,
                 log: Callable[[str], None] = print, lu: str = "crash") -> None:
        self.config = config or HarnessConfig()
        self.work_dir = Path(work_dir)
        self.log = log
        self.lu = lu
        self.rng = random.Random(self.config.seed)
        extra = ["--workers", str(self.config.workers)] if self.config.workers else []
        self.device = DeviceProcess(data_dir=self.work_dir / "data", extra_args=extra)
        self.nslots = self.config.size // BLOCK
        self.report = Report()
        self.cycle = 0
        self.baseline: bytearray = bytearray(self.config.size)
        self.baseline_idents: list = [None] * self.nslots
        # generations as read after the last restart (kept whole, to show what changed)
        self.gen_images: dict[int, bytearray] = {}
        self.canary_gen: int | None = None
        self._pinned = 0
        self._t0 = 0.0
        self.lu_uuid = ""
        self.violating_cycles: set[int] = set()
        # Fault injection, to calibrate the checks: called with the harness after the
        # kill (device down) and just before the equality check's trigger (device up).
        self.after_kill: Callable[[CrashHarness], None] | None = None
        self.before_verify: Callable[[CrashHarness], None] | None = None
        self.last_writes: list[Write] = []
        self.last_flushes: list[Flush] = []

    # ------------------------------------------------------------ set-up

    def start(self) -> CrashHarness:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.device.start()
        self.device.create_lu(str(self.config.size), pool=self.config.pool, name=self.lu)
        status, body = self._api("GET", f"/v1/lus/{self.lu}")
        self.lu_uuid = body["uuid"] if status == 200 else ""  # type: ignore[index]
        if self.config.canary:
            self._make_canary()
        return self

    def close(self) -> None:
        if self.device.proc is not None and self.device.proc.poll() is None:
            self.device.stop()

    def __enter__(self) -> CrashHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_canary(self) -> None:
        """Some blocks, a generation of them, pinned: it must never change."""
        with NbdClient(self.device.uri(self.lu), timeout=self.config.io_timeout) as client:
            for n, slot in enumerate(self.rng.sample(range(self.nslots), 256), 1):
                client.pwrite(make_block(0, CANARY_WRITER, n, slot), slot * BLOCK)
            client.flush()
        answer = self._api_trigger("canary")
        gen = answer["generations"][0]["gen"]
        status, body = self.device.request("POST", f"/v1/lus/{self.lu}/backups/{gen}/pin")
        if status != 200:
            raise HarnessError(f"pinning the canary generation {gen} failed: {status} {body}")
        self.canary_gen = gen
        self._pinned = 1
        self.baseline = self._read(self.lu)
        self.baseline_idents = scan(self.baseline)
        self.gen_images[gen] = self._read(f"{self.lu}@{gen}")
        if self.gen_images[gen] != self.baseline:
            raise HarnessError("the canary generation differs from the primary it was made of")

    # ------------------------------------------------------------ small tools

    def _read(self, export: str) -> bytearray:
        with NbdClient(self.device.uri(export), timeout=self.config.io_timeout) as client:
            image = bytearray(client.size)
            view = memoryview(image)
            for off in range(0, client.size, READ_STEP):
                client.pread_into(view[off : off + READ_STEP], off)
        return image

    def _api(self, method: str, path: str, body: object | None = None,
             timeout: float = 30.0) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.device.api + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"null")
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def _api_trigger(self, label: str) -> dict:
        status, body = self._api("POST", f"/v1/lus/{self.lu}/trigger", {"label": label})
        if status != 200:
            raise HarnessError(f"trigger {label!r} failed: {status} {body}")
        return body  # type: ignore[return-value]

    def _mirror(self) -> dict:
        status, body = self._api("GET", "/v1/status")
        if status != 200:
            raise HarnessError(f"GET /v1/status answered {status}: {body}")
        for lu in body["lus"]:  # type: ignore[index]
            if lu["name"] == self.lu:
                return lu["mirror"] or {}
        raise HarnessError(f"LU {self.lu} is not in /v1/status after the restart")

    def _backups(self) -> list[dict]:
        status, body = self._api("GET", f"/v1/lus/{self.lu}/backups")
        if status != 200:
            raise HarnessError(f"GET backups answered {status}: {body}")
        return body  # type: ignore[return-value]

    def _wait_in_sync(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._mirror().get("active_state") == "in-sync":
                return True
            time.sleep(0.02)
        return False

    def _violation(self, kind: str, **detail: object) -> None:
        self.report.violations[kind] += 1
        self._cycle_violations += 1
        if self.report.violations[kind] <= EXAMPLES_KEPT:  # the first few of each kind
            self.report.examples.append({"cycle": self.cycle, "kind": kind, **detail})
        if self._cycle_violations <= 5:
            self.log(f"  VIOLATION cycle {self.cycle} {kind}: {detail}")

    def _rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self._t0, 4)

    def _desc(self, w: Write | None) -> dict | None:
        if w is None:
            return None
        if w.send == NEG_INF:
            return {"ident": w.ident, "baseline": True}
        return {"ident": w.ident, "send": self._rel(w.send), "ack": self._rel(w.ack),
                "fua": w.fua}

    # ------------------------------------------------------------ load

    def _writer(self, idx: int, client: NbdClient, stop: threading.Event, out: list[Write],
                flushes: list[Flush], errors: list[str], seed: int) -> None:
        cfg = self.config
        rng = random.Random(seed)
        shared = cfg.shared_slots
        span = (self.nslots - shared) // cfg.writers
        own = (shared + idx * span, shared + (idx + 1) * span)
        counter = 0
        try:
            while not stop.is_set():
                if shared and rng.random() < cfg.shared_fraction:
                    slot = rng.randrange(0, shared)
                else:
                    slot = rng.randrange(*own)
                counter += 1
                fua = rng.random() < cfg.fua_rate
                data = make_block(self.cycle, idx, counter, slot)
                rec = Write((self.cycle, idx, counter), slot, time.monotonic(), None, fua)
                out.append(rec)
                try:
                    client.pwrite(data, slot * BLOCK, fua=fua)
                except NbdError as exc:
                    if exc.code:  # an error reply: not acknowledged, the connection goes on
                        errors.append(f"writer {idx}: write to slot {slot}: {exc}")
                        continue
                    return
                rec.ack = time.monotonic()
                if rng.random() < cfg.flush_rate:
                    f = Flush(time.monotonic())
                    flushes.append(f)
                    client.flush()
                    f.ack = time.monotonic()
        except (OSError, NbdError):
            return  # the device is gone

    def _trigger_thread(self, idx: int, stop: threading.Event, out: list[TriggerRec],
                        errors: list[str], seed: int) -> None:
        cfg = self.config
        rng = random.Random(seed)
        clients: dict[str, NbdClient] = {}
        n = 0
        try:
            clients["path"] = NbdClient(self.device.uri(f"{self.lu}:trigger"),
                                        timeout=cfg.io_timeout)
            clients["in-band"] = NbdClient(self.device.uri(self.lu),
                                           contexts=("mirrorpool:trigger",),
                                           timeout=cfg.io_timeout)
            clients["trigger-lu"] = NbdClient(self.device.uri(".trigger"), timeout=cfg.io_timeout)
            self._ready.wait(10)
            while not stop.is_set():
                if n:
                    time.sleep(rng.uniform(*cfg.trigger_pause))
                n += 1
                mech = cfg.mechanisms[(n + idx) % len(cfg.mechanisms)]
                label = f"c{self.cycle}-t{idx}-n{n}"
                rec = TriggerRec(label, mech, time.monotonic())
                out.append(rec)
                try:
                    answer = self._fire(mech, label, clients)
                except _Refused as exc:
                    rec.refused = str(exc)
                    continue
                except NbdError as exc:
                    if exc.code:
                        rec.error = str(exc)
                        errors.append(f"trigger {label} by {mech}: {exc}")
                        continue
                    return
                rec.answer = time.monotonic()
                g = answer["generations"][0]
                rec.gen, rec.seq, rec.member = g["gen"], g["seq"], g.get("member")
                if g.get("label") != label:
                    errors.append(f"trigger {label} answered with label {g.get('label')!r}")
        except (OSError, http.client.HTTPException, NbdError, ValueError, KeyError):
            return  # the device was killed under this thread (mid-answer, too)
        finally:
            for c in clients.values():
                with contextlib.suppress(Exception):
                    c.abort()

    def _fire(self, mech: str, label: str, clients: dict[str, NbdClient]) -> dict:
        if mech == "api":
            status, body = self._api("POST", f"/v1/lus/{self.lu}/trigger", {"label": label},
                                     timeout=self.config.io_timeout)
            if status == 409:
                raise _Refused(str(body))
            if status != 200:
                raise NbdError(f"API trigger answered {status}: {body}", 5)
            return body  # type: ignore[return-value]
        if mech == "in-band":
            try:
                return clients["in-band"].trigger(label)
            except NbdError as exc:
                if exc.code == 28:  # ENOSPC: nothing to recycle
                    raise _Refused(str(exc)) from None
                raise
        if mech == "path":
            client = clients["path"]
            payload = label.encode()
        else:
            client = clients["trigger-lu"]
            payload = f"MPTRIGGER 1\nlu {self.lu}\nlabel {label}\n".encode()
        try:
            client.pwrite(payload.ljust(512, b"\0"), 0)
        except NbdError as exc:
            if exc.code == 28:
                raise _Refused(str(exc)) from None
            raise
        return json.loads(client.pread(4096, 0).rstrip(b"\0"))

    # ------------------------------------------------------------ one cycle

    def run_cycle(self) -> CycleResult:
        cfg = self.config
        self.cycle += 1
        self._cycle_violations = 0
        early = self.rng.random() < cfg.early_kill_fraction
        load = self.rng.uniform(*(cfg.early_kill_seconds if early else cfg.load_seconds))
        stop = threading.Event()
        self._ready = threading.Event()
        writes: list[list[Write]] = [[] for _ in range(cfg.writers)]
        flushes: list[Flush] = []
        triggers: list[list[TriggerRec]] = [[] for _ in range(cfg.trigger_threads)]
        errors: list[str] = []
        clients = [NbdClient(self.device.uri(self.lu), timeout=cfg.io_timeout)
                   for _ in range(cfg.writers)]
        threads = [
            threading.Thread(target=self._writer, name=f"writer-{i}", daemon=True,
                             args=(i, clients[i], stop, writes[i], flushes, errors,
                                   self.rng.randrange(1 << 30)))
            for i in range(cfg.writers)
        ] + [
            threading.Thread(target=self._trigger_thread, name=f"trigger-{i}", daemon=True,
                             args=(i, stop, triggers[i], errors, self.rng.randrange(1 << 30)))
            for i in range(cfg.trigger_threads)
        ]
        for t in threads[cfg.writers :]:
            t.start()
        time.sleep(0.05)  # trigger connections made
        self._t0 = time.monotonic()
        self._ready.set()
        for t in threads[: cfg.writers]:
            t.start()
        time.sleep(load)
        killed_at = time.monotonic()
        assert self.device.proc is not None
        if cfg.crash:
            self.device.stop(signal.SIGKILL)  # os.kill(pid, SIGKILL), then wait
        stop.set()
        for t in threads:
            t.join(cfg.io_timeout + 5)
        for c in clients:
            with contextlib.suppress(Exception):
                c.abort()
        if any(t.is_alive() for t in threads):
            raise HarnessError("load threads still running after the device was killed")
        for e in errors:
            self.report.anomalies["request-error"] += 1
            self.log(f"  note cycle {self.cycle}: {e}")

        result = CycleResult(self.cycle, killed_at - self._t0)
        all_writes = [w for ws in writes for w in ws]
        all_triggers = [t for ts in triggers for t in ts]
        result.writes_sent = len(all_writes)
        result.writes_acked = sum(1 for w in all_writes if w.ack is not None)
        result.triggers_sent = len(all_triggers)
        result.triggers_acked = sum(1 for t in all_triggers if t.answer is not None)
        result.triggers_refused = sum(1 for t in all_triggers if t.refused)

        self.last_writes, self.last_flushes = all_writes, flushes
        if cfg.crash:
            if cfg.snapshot:
                self._snapshot()
            if self.after_kill is not None:
                self.after_kill(self)
            self._restart(result)
        else:
            self._restarted_at = time.monotonic()
        self._check(result, all_writes, flushes, all_triggers)
        if cfg.crash and cfg.snapshot:
            self._save_logs(killed_at, all_writes, flushes, all_triggers)
        result.violations = self._cycle_violations
        if result.violations:
            self.violating_cycles.add(self.cycle)
        r = self.report
        r.cycles += 1
        r.writes_sent += result.writes_sent
        r.writes_acked += result.writes_acked
        r.triggers_sent += result.triggers_sent
        r.triggers_acked += result.triggers_acked
        r.triggers_refused += result.triggers_refused
        return result

    def data_file(self, member: int | None = None) -> Path:
        """The primary's data file, or pool member ``member``'s (for fault injection)."""
        name = f"{self.lu_uuid}.img" if member is None else f"{self.lu_uuid}.m{member}.img"
        return self.device.data_dir / "lu" / name

    def mirror_status(self) -> dict:
        return self._mirror()

    def generations(self) -> list[dict]:
        return self._backups()

    def _snapshot(self) -> None:
        """The data directory as the crash left it, as snapshot-<cycle>.

        The last three are kept, and those of cycles that found violations.
        """
        dest = self.work_dir / f"snapshot-{self.cycle}"
        subprocess.run(["cp", "-a", "--sparse=always", str(self.device.data_dir), str(dest)],
                       check=True, timeout=120)
        old = self.work_dir / f"snapshot-{self.cycle - 3}"
        if old.exists() and self.cycle - 3 not in self.violating_cycles:
            shutil.rmtree(old)

    def _save_logs(self, killed_at: float, writes: list[Write], flushes: list[Flush],
                   triggers: list[TriggerRec]) -> None:
        """The cycle's request logs beside its snapshot (times relative to the load's start)."""
        dest = self.work_dir / f"snapshot-{self.cycle}" / "harness-log.json"
        doc = {
            "cycle": self.cycle, "killed_at": self._rel(killed_at),
            "writes": [[w.slot, w.ident, self._rel(w.send), self._rel(w.ack), w.fua]
                       for w in writes],
            "flushes": [[self._rel(f.send), self._rel(f.ack)] for f in flushes],
            "triggers": [[t.label, t.mechanism, self._rel(t.send), self._rel(t.answer), t.gen,
                          t.seq, t.member, t.refused] for t in triggers],
        }
        dest.write_text(json.dumps(doc))

    def _restart(self, result: CycleResult) -> None:
        log_path = self.device.log_path
        offset = log_path.stat().st_size if log_path and log_path.exists() else 0
        t = time.monotonic()
        self.device.start()
        result.restart_to_serving_s = time.monotonic() - t
        self.report.to_serving.append(result.restart_to_serving_s)
        text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path else ""
        m = re.search(r"recovered after an unclean stop .*?bytes_to_resync=(\d+)", text)
        if m:
            result.bytes_to_resync = int(m.group(1))
            self.report.resync_bytes.append(result.bytes_to_resync)
        else:
            self.report.anomalies["no-recovery-line"] += 1
        self._restarted_at = t

    # ------------------------------------------------------------ checks

    def _check(self, result: CycleResult, writes: list[Write], flushes: list[Flush],
               triggers: list[TriggerRec]) -> None:
        cfg = self.config
        r = self.report
        by_ident: dict[Ident, Write] = {w.ident: w for w in writes}  # type: ignore[misc]
        per_slot: dict[int, list[Write]] = {}
        for w in writes:
            per_slot.setdefault(w.slot, []).append(w)
        base = [Write(self.baseline_idents[s], s, NEG_INF, NEG_INF)
                if not isinstance(self.baseline_idents[s], str) else None
                for s in range(self.nslots)]

        def observed(slot: int, ident: object, where: str, **ctx: object) -> Write | None:
            if isinstance(ident, str):
                self._violation("bad-block", where=where, slot=slot, what=ident, **ctx)
                return None
            b = base[slot]
            if b is not None and ident == b.ident:
                return b
            w = by_ident.get(ident) if ident is not None else None  # type: ignore[arg-type]
            if w is not None and w.slot == slot:
                return w
            if ident is None:
                self._violation("reverted-to-zero", where=where, slot=slot,
                                baseline=self._desc(b), **ctx)
            else:
                self._violation("unknown-write", where=where, slot=slot, found=ident,
                                baseline=self._desc(b), **ctx)
            return None

        # ---- (a) durability on the primary
        primary = self._read(self.lu)
        p_idents = scan(primary, self.baseline, self.baseline_idents)
        flush_sends = [f.send for f in flushes if f.ack is not None]
        last_flush = max(flush_sends, default=NEG_INF)
        durable_by_slot: dict[int, Write] = {}
        acked_by_slot: dict[int, Write] = {}
        for w in writes:
            if w.ack is None:
                continue
            acked_by_slot[w.slot] = _later(acked_by_slot.get(w.slot), w)
            if w.fua or w.ack < last_flush:
                durable_by_slot[w.slot] = _later(durable_by_slot.get(w.slot), w)
                result.durable_checked += 1
        result.acked_checked = result.writes_acked
        for slot in range(self.nslots):
            o = observed(slot, p_idents[slot], "primary")
            if o is None:
                continue
            need = durable_by_slot.get(slot)
            if need is not None and o.precedes(need):
                self._violation("durable-write-lost", where="primary", slot=slot,
                                lost=self._desc(need), found=self._desc(o))
            elif (need := acked_by_slot.get(slot)) is not None and o.precedes(need):
                r.acked_nondurable_lost += 1
        r.durable_checked += result.durable_checked
        r.acked_checked += result.acked_checked
        r.slots_checked += self.nslots

        # ---- (b) generations of this cycle's triggers, (d) older generations
        listed = self._backups()
        live = {g["gen"]: g for g in listed}
        by_label = {t.label: t for t in triggers}
        new_images: dict[int, bytearray] = {}
        for g in listed:
            gen = g["gen"]
            image = self._read(f"{self.lu}@{gen}")
            new_images[gen] = image
            trig = by_label.get(g.get("label") or "")
            old = self.gen_images.get(gen)
            if old is not None:
                result.gens_hash_checked += 1
                if image != old:
                    diff = _differing_slots(image, old)
                    self._violation(
                        "generation-changed", gen=gen, label=g.get("label"),
                        pinned=g.get("pinned"), state=g.get("state"), count=len(diff),
                        details=[{"slot": s, "before": parse_block(bytes(old[s * BLOCK:
                                                                             (s + 1) * BLOCK]), s),
                                  "now": parse_block(bytes(image[s * BLOCK:(s + 1) * BLOCK]), s)}
                                 for s in diff[:6]])
                continue
            if trig is None:
                r.anomalies["generation-of-unknown-trigger"] += 1
                self._violation("unexplained-generation", gen=gen, listing=g)
                continue
            idents = scan(image, primary, p_idents)
            if trig.answer is not None:
                result.gens_prefix_checked += 1
                if trig.gen != gen or trig.seq != g.get("seq"):
                    self._violation("generation-metadata", label=trig.label,
                                    answered=(trig.gen, trig.seq), listed=(gen, g.get("seq")))
            else:
                result.gens_unacked_checked += 1
            self._check_prefix(gen, trig, idents, per_slot, observed)
        # acknowledged triggers whose generation is gone: legitimately only if a later
        # split recycled its member (now the active backup, or holding a newer generation)
        keep = cfg.pool - 1 - self._pinned
        unpinned = [gen for gen, g in live.items() if not g.get("pinned")]
        members = {m["member"]: m for m in self._mirror().get("members", [])}
        newest_on: dict[int, int] = {}  # member -> newest generation answered on it
        for t in triggers:
            if t.answer is not None and t.member is not None and t.gen is not None:
                newest_on[t.member] = max(newest_on.get(t.member, 0), t.gen)
        for t in triggers:
            if t.answer is None or t.gen in live and live[t.gen].get("label") == t.label:
                continue
            now = members.get(t.member) if t.member is not None else None
            if now is not None:
                recycled = (
                    now.get("state") == "active"
                    or now.get("state") == "generation" and (now.get("gen") or 0) > (t.gen or 0)
                    or newest_on.get(t.member, 0) > (t.gen or 0)  # reused by a later answer
                )
            else:  # no member known: the pool keeps the newest `keep` generations
                recycled = sum(1 for gen in unpinned if gen > (t.gen or 0)) >= keep
            if recycled:
                result.acked_gens_recycled += 1
            else:
                self._violation("acked-generation-missing", label=t.label, gen=t.gen, seq=t.seq,
                                member=t.member, member_now=now, mechanism=t.mechanism,
                                send=self._rel(t.send), answer=self._rel(t.answer),
                                live=sorted(live))

        # ---- (c) mirror equality once in sync
        ok = self._wait_in_sync(cfg.in_sync_timeout)
        if ok:
            result.restart_to_in_sync_s = time.monotonic() - self._restarted_at
            r.to_in_sync.append(result.restart_to_in_sync_s)
            if self.before_verify is not None:
                self.before_verify(self)
            answer = self._api_trigger(f"c{self.cycle}-verify")
            vgen = answer["generations"][0]["gen"]
            gimage = self._read(f"{self.lu}@{vgen}")
            r.equality_checks += 1
            if gimage != primary:
                diff = _differing_slots(gimage, primary)
                self._violation("mirror-differs", gen=vgen, differing_slots=diff[:12],
                                differing_chunks=sorted({s * BLOCK // CHUNK for s in diff})[:12],
                                count=len(diff),
                                details=[{"slot": s, "primary": p_idents[s],
                                          "backup": parse_block(bytes(gimage[s * BLOCK:
                                                                             (s + 1) * BLOCK]),
                                                                s)} for s in diff[:6]])
            new_images[vgen] = gimage
        else:
            self._violation("not-in-sync", timeout=cfg.in_sync_timeout, mirror=self._mirror())
        still = {g["gen"] for g in self._backups()}
        self.gen_images = {g: im for g, im in new_images.items() if g in still}
        self.baseline = primary
        self.baseline_idents = p_idents
        r.gens_prefix_checked += result.gens_prefix_checked
        r.gens_unacked_checked += result.gens_unacked_checked
        r.gens_hash_checked += result.gens_hash_checked
        r.acked_gens_recycled += result.acked_gens_recycled

    def _check_prefix(self, gen: int, trig: TriggerRec, idents: list,
                      per_slot: dict[int, list[Write]],
                      observed: Callable[..., Write | None]) -> None:
        lower, upper = trig.send, trig.answer
        ctx = {"gen": gen, "label": trig.label, "mechanism": trig.mechanism,
               "trigger_send": self._rel(lower), "trigger_answer": self._rel(upper)}
        for slot in range(self.nslots):
            o = observed(slot, idents[slot], f"generation {gen}", **ctx)
            if o is None:
                continue
            if upper is not None and o.send > upper:
                self._violation("write-after-trigger-in-generation", slot=slot,
                                found=self._desc(o), **ctx)
                continue
            need = None
            for w in per_slot.get(slot, ()):
                if w.ack is not None and w.ack < lower:
                    need = _later(need, w)
            if need is not None and o.precedes(need):
                self._violation("write-before-trigger-missing", slot=slot,
                                missing=self._desc(need), found=self._desc(o), **ctx)

    # ------------------------------------------------------------ many cycles

    def run(self, cycles: int, on_cycle: Callable[[CycleResult], None] | None = None,
            deadline: float | None = None) -> Report:
        started = time.monotonic()
        for _ in range(cycles):
            if deadline is not None and time.monotonic() > deadline:
                self.log(f"stopping early: time budget used after {self.report.cycles} cycles")
                break
            result = self.run_cycle()
            self.report.seconds = time.monotonic() - started
            if on_cycle is not None:
                on_cycle(result)
        self.report.seconds = time.monotonic() - started
        return self.report


class _Refused(Exception):
    """A trigger refused (no member to recycle): an answer, not a failure."""


def _later(a: Write | None, b: Write) -> Write:
    """Of two writes to a slot, the one sent last (the strongest requirement)."""
    return b if a is None or b.send > a.send else a


def _differing_slots(a: bytearray, b: bytearray) -> list[int]:
    return [s for s in range(len(a) // BLOCK)
            if a[s * BLOCK : (s + 1) * BLOCK] != b[s * BLOCK : (s + 1) * BLOCK]]
