"""FastAPI application of the control API."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirrorpool import __version__
from mirrorpool.api.jobs import Jobs
from mirrorpool.api.models import (
    DeviceStatus,
    ErrorBody,
    FaultRequest,
    GroupTriggerRequest,
    LuCreate,
    LuInfo,
    LuResize,
    LuSettings,
    PromoteRequest,
    RemoteAdd,
    RemoteResync,
    ReplicaOf,
    RestoreRequest,
    TriggerAnswer,
    TriggerRequest,
)
from mirrorpool.device.check import check_device
from mirrorpool.device.device import Device
from mirrorpool.errors import InvalidRequest, MirrorpoolError
from mirrorpool.metrics import IoStats, make_registry
from mirrorpool.replication.link import LinkOptions
from mirrorpool.store.fault import FaultRule

_ERRORS = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}}


def create_app(
    device: Device,
    nbd_addresses: list[str] | None = None,
    api_address: str = "",
    connection_count: Callable[[], int] = lambda: 0,
    io_stats: IoStats | None = None,
) -> FastAPI:
    app = FastAPI(
        title="mirrorpool control API",
        version=__version__,
        description="Manage the logical units of one mirrorpool device.",
        redirect_slashes=False,
    )
    started = time.time()
    jobs = Jobs()

    @app.exception_handler(MirrorpoolError)
    async def _refused(_: Request, exc: MirrorpoolError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.get("/v1/status", response_model=DeviceStatus)
    def status() -> DeviceStatus:
        return DeviceStatus(
            version=__version__,
            device_id=device.device_id,
            pid=os.getpid(),
            data_dir=device.data_dir,
            nbd=nbd_addresses or [],
            api=api_address,
            uptime_seconds=round(time.time() - started, 3),
            connections=connection_count(),
            lus=[LuInfo.of(lu, device.backups.status(lu)) for lu in device.list_lus()],
        )

    @app.get("/v1/lus", response_model=list[LuInfo])
    def list_lus() -> list[LuInfo]:
        return [LuInfo.of(lu) for lu in device.list_lus()]

    @app.post("/v1/lus", response_model=LuInfo, status_code=201, responses=_ERRORS)
    def create_lu(body: LuCreate) -> LuInfo:
        return LuInfo.of(device.create_lu(body.name, body.size, body.pool, body.backing))

    @app.get("/v1/lus/{name}", response_model=LuInfo, responses=_ERRORS)
    def get_lu(name: str) -> LuInfo:
        lu = device.get_lu(name)
        return LuInfo.of(lu, device.backups.status(lu))

    @app.patch("/v1/lus/{name}", response_model=LuInfo, responses=_ERRORS)
    def set_lu(name: str, body: LuSettings) -> LuInfo:
        if body.pool is not None:
            device.backups.set_pool(name, body.pool)
        lu = device.get_lu(name)
        return LuInfo.of(lu, device.backups.status(lu))

    @app.post("/v1/lus/{name}/repair", response_model=LuInfo, responses=_ERRORS)
    def repair_lu(name: str) -> LuInfo:
        lu = device.get_lu(name)
        lu.volume.ensure_active(retry_failed=True)
        return LuInfo.of(lu, device.backups.status(lu))

    @app.post("/v1/lus/{name}/trigger", response_model=TriggerAnswer, responses=_ERRORS)
    def trigger_lu(name: str, body: TriggerRequest | None = None) -> dict:
        body = body or TriggerRequest()
        answers = device.triggers.trigger([name], body.label, body.source)
        return {"trigger_id": answers[0]["trigger_id"], "generations": answers}

    @app.post("/v1/trigger", response_model=TriggerAnswer, responses=_ERRORS)
    def trigger_group(body: GroupTriggerRequest) -> dict:
        answers = device.triggers.trigger(body.lus, body.label, body.source)
        return {"trigger_id": answers[0]["trigger_id"], "generations": answers}

    @app.get("/v1/triggers", responses=_ERRORS)
    def triggers(lu: str | None = None, limit: int = 100) -> list[dict]:
        return device.catalog.triggers(lu, limit)

    @app.get("/v1/lus/{name}/backups", responses=_ERRORS)
    def backups(name: str) -> list[dict]:
        return device.backups.generations(name)

    @app.post("/v1/lus/{name}/backups/{gen}/pin", responses=_ERRORS)
    def pin(name: str, gen: int) -> dict:
        return device.backups.pin(name, gen, True)

    @app.delete("/v1/lus/{name}/backups/{gen}/pin", responses=_ERRORS)
    def unpin(name: str, gen: int) -> dict:
        answer = device.backups.pin(name, gen, False)
        device.get_lu(name).volume.ensure_active()
        return answer

    @app.get("/v1/lus/{name}/diff", responses=_ERRORS)
    def diff(name: str, older: int = Query(alias="from"),
             newer: int | None = Query(None, alias="to")) -> dict:
        return device.backups.diff(name, older, newer)

    @app.post("/v1/lus/{name}/restore", status_code=202, responses=_ERRORS)
    def restore(name: str, body: RestoreRequest) -> dict:
        device.backups.check_restore(name, body.gen, body.force)
        job = jobs.start("restore", name, lambda progress: device.backups.restore(
            name, body.gen, body.force, progress))
        return job.as_dict()

    registry = make_registry(device, io_stats or IoStats())

    @app.post("/v1/lus/{name}/remote", status_code=201, responses=_ERRORS)
    def add_remote(name: str, body: RemoteAdd) -> dict:
        options = LinkOptions(sync_timeout=body.sync_timeout, link_timeout=body.link_timeout,
                              give_up_after=body.give_up_after, nbd_address=body.nbd_address,
                              tls_ca=body.tls_ca, tls_cert=body.tls_cert, tls_key=body.tls_key)
        return device.remotes.add(name, body.device, body.remote_name, body.remote_pool,
                                  body.mode, body.journal_limit, options)

    @app.post("/v1/lus/{name}/remote/resync", status_code=202, responses=_ERRORS)
    def resync_remote(name: str, body: RemoteResync) -> dict:
        if not body.reverse:
            return {"state": "done", "result": device.remotes.resync(name), "id": None}
        device.remotes.check_reverse(name, body.force)
        job = jobs.start("resync-reverse", name, lambda progress: device.remotes.resync(
            name, True, body.force, progress))
        return job.as_dict()

    @app.put("/v1/lus/{name}/replica-of", responses=_ERRORS)
    def accept_source(name: str, body: ReplicaOf) -> dict:
        return device.remotes.accept_source(name, body.source_device, body.source_lu,
                                            body.source_uuid)

    @app.delete("/v1/lus/{name}/replica-of", status_code=204, responses=_ERRORS)
    def release_source(name: str, source_uuid: str) -> None:
        device.remotes.release_source(name, source_uuid)

    @app.get("/v1/lus/{name}/replica-of", responses=_ERRORS)
    def replica_of(name: str) -> dict:
        return device.remotes.copy_status(name)

    @app.post("/v1/lus/{name}/promote", responses=_ERRORS)
    def promote(name: str, body: PromoteRequest | None = None) -> dict:
        return device.remotes.promote(name, (body or PromoteRequest()).gen)

    @app.get("/v1/lus/{name}/checksums", response_class=Response, responses=_ERRORS)
    def checksums(name: str, offset: int = 0, length: int = Query(...)) -> Response:
        """16-byte BLAKE2b digests of each 4 KiB chunk of the range, back to back."""
        return Response(device.remotes.checksums(name, offset, length),
                        media_type="application/octet-stream")

    @app.get("/v1/lus/{name}/remote", responses=_ERRORS)
    def remote_status(name: str) -> dict:
        return device.remotes.status(name)

    @app.delete("/v1/lus/{name}/remote", status_code=204, responses=_ERRORS)
    def remove_remote(name: str) -> None:
        device.remotes.remove(name)

    @app.get("/v1/lus/{name}/remote/backups", responses=_ERRORS)
    def remote_backups(name: str) -> list[dict]:
        return device.remotes.generations(name)

    @app.get("/v1/remotes")
    def remotes() -> list[dict]:
        return device.remotes.all_status()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/check")
    def check(repair: bool = False) -> dict:
        return check_device(device, repair)

    @app.get("/v1/recovery")
    def recovery() -> dict:
        return {"clean_start": device.clean_start,
                "lus": [r.as_dict() for r in device.recovery]}

    @app.get("/v1/lus/{name}/faults", responses=_ERRORS)
    def faults(name: str) -> dict:
        return {target: [r.as_dict() for r in device.fault_store(name, target).rules]
                for target in ["primary"] + [f"member:{m.idx}" for m in
                                             device.get_lu(name).volume.members]}

    @app.post("/v1/lus/{name}/faults", status_code=201, responses=_ERRORS)
    def add_fault(name: str, body: FaultRequest) -> dict:
        store = device.fault_store(name, body.target)
        rule = FaultRule(op=body.op, effect=body.effect, offset=body.offset, length=body.length,
                         after=body.after, times=body.times, delay=body.delay)
        try:
            store.add(rule)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return rule.as_dict()

    @app.delete("/v1/lus/{name}/faults", status_code=204, responses=_ERRORS)
    def clear_faults(name: str) -> None:
        device.fault_store(name, "primary").clear()
        for m in device.get_lu(name).volume.members:
            device.fault_store(name, f"member:{m.idx}").clear()

    @app.get("/v1/jobs/{job_id}", responses=_ERRORS)
    def job(job_id: str) -> dict:
        return jobs.get(job_id).as_dict()

    @app.delete("/v1/lus/{name}", status_code=204, responses=_ERRORS)
    def delete_lu(name: str, force: bool = False) -> None:
        device.delete_lu(name, force=force)

    @app.post("/v1/lus/{name}/resize", response_model=LuInfo, responses=_ERRORS)
    def resize_lu(name: str, body: LuResize) -> LuInfo:
        return LuInfo.of(device.resize_lu(name, body.size))

    return app
