"""FastAPI application of the control API."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mirrorpool import __version__
from mirrorpool.api.models import DeviceStatus, ErrorBody, LuCreate, LuInfo, LuResize
from mirrorpool.device.device import Device
from mirrorpool.errors import MirrorpoolError

_ERRORS = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}}


def create_app(
    device: Device,
    nbd_addresses: list[str] | None = None,
    api_address: str = "",
    connection_count: Callable[[], int] = lambda: 0,
) -> FastAPI:
    app = FastAPI(
        title="mirrorpool control API",
        version=__version__,
        description="Manage the logical units of one mirrorpool device.",
    )
    started = time.time()

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
            pid=os.getpid(),
            data_dir=device.data_dir,
            nbd=nbd_addresses or [],
            api=api_address,
            uptime_seconds=round(time.time() - started, 3),
            connections=connection_count(),
            lus=[LuInfo.of(lu) for lu in device.list_lus()],
        )

    @app.get("/v1/lus", response_model=list[LuInfo])
    def list_lus() -> list[LuInfo]:
        return [LuInfo.of(lu) for lu in device.list_lus()]

    @app.post("/v1/lus", response_model=LuInfo, status_code=201, responses=_ERRORS)
    def create_lu(body: LuCreate) -> LuInfo:
        return LuInfo.of(device.create_lu(body.name, body.size, body.pool, body.backing))

    @app.get("/v1/lus/{name}", response_model=LuInfo, responses=_ERRORS)
    def get_lu(name: str) -> LuInfo:
        return LuInfo.of(device.get_lu(name))

    @app.delete("/v1/lus/{name}", status_code=204, responses=_ERRORS)
    def delete_lu(name: str, force: bool = False) -> None:
        device.delete_lu(name, force=force)

    @app.post("/v1/lus/{name}/resize", response_model=LuInfo, responses=_ERRORS)
    def resize_lu(name: str, body: LuResize) -> LuInfo:
        return LuInfo.of(device.resize_lu(name, body.size))

    return app
