"""Shapes of the control API's requests and answers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field

from mirrorpool.device.device import LogicalUnit
from mirrorpool.sizes import parse_size


def _human_size(value: object) -> object:
    return parse_size(value) if isinstance(value, str) else value


# bytes, or a string such as "64M"
Size = Annotated[int, BeforeValidator(_human_size)]


class LuCreate(BaseModel):
    name: str = Field(description="LU name: letters, digits, '.', '_', '-'")
    size: Size | None = Field(None, description="bytes; '64M' style strings are accepted too")
    pool: int = Field(3, ge=0, le=64, description="backup pool size; 0 means no backups")
    backing: str | None = Field(None, description="existing file or block device to use")


class LuResize(BaseModel):
    size: Size


class LuInfo(BaseModel):
    name: str
    uuid: str
    size: int
    pool: int
    backing: str | None
    data_path: str
    connections: int
    created: float
    mirror: dict | None = None

    @classmethod
    def of(cls, lu: LogicalUnit, mirror: dict | None = None) -> LuInfo:
        return cls(
            mirror=mirror,
            name=lu.name,
            uuid=lu.record.uuid,
            size=lu.size,
            pool=lu.record.pool,
            backing=lu.record.backing,
            data_path=lu.data_path,
            connections=len(lu.sessions),
            created=lu.record.created,
        )


class DeviceStatus(BaseModel):
    version: str
    device_id: str
    pid: int
    data_dir: str
    nbd: list[str]
    api: str
    uptime_seconds: float
    connections: int
    lus: list[LuInfo]


class ErrorBody(BaseModel):
    detail: str


class LuSettings(BaseModel):
    pool: int | None = Field(None, ge=0, le=64, description="new backup pool size")


class TriggerRequest(BaseModel):
    label: str = Field("", max_length=256)
    source: str = Field("api", pattern="^(api|cli)$")


class GroupTriggerRequest(TriggerRequest):
    lus: list[str] = Field(min_length=1, description="LUs split at one consistent cut")


class GenerationAnswer(BaseModel):
    lu: str
    gen: int
    seq: int | None
    trigger_id: str
    label: str
    source: str
    created: float
    member: int
    split_ms: float | None = Field(
        None, description="trigger received to generation readable (reads wait only for "
                          "earlier writes they overlap)")
    settle_ms: float | None = Field(
        None, description="trigger received to every earlier write finished")
    replicated: bool | None = Field(
        None, description="replicated LUs only: the TRIGGER went to the remote device in its "
                          "place in the stream (false: the remote copy was not consistent)")


class TriggerAnswer(BaseModel):
    trigger_id: str
    generations: list[GenerationAnswer]


class RestoreRequest(BaseModel):
    gen: int = Field(ge=1)
    force: bool = False


class FaultRequest(BaseModel):
    target: str = Field("primary", description="'primary', 'active' or 'member:N'")
    op: str = Field("write", pattern="^(read|write|zero|trim|flush|any)$")
    effect: str = Field("eio", pattern="^(eio|enospc|short|delay)$")
    offset: int = Field(0, ge=0)
    length: int = Field(0, ge=0, description="0: to the end")
    after: int = Field(0, ge=0, description="let this many matching operations pass first")
    times: int = Field(0, ge=0, description="fire this many times (0: always)")
    delay: float = Field(0.0, ge=0, le=60)


class RemoteAdd(BaseModel):
    device: str = Field(description="the remote device's control API, http://HOST:PORT")
    remote_name: str | None = Field(None, description="remote LU name (default: the same)")
    remote_pool: int = Field(3, ge=1, le=64, description="pool size of a remote LU created now")
    mode: str = Field("async", description="async | sync")
    journal_limit: Size = Field(1 << 30, description="replication journal limit, bytes")
    sync_timeout: float = Field(5.0, ge=0, le=3600,
                                description="sync mode: seconds to wait for the remote device "
                                            "before going on as async (0: no limit, until "
                                            "the link gives up)")
    link_timeout: float = Field(30.0, gt=0, le=3600,
                                description="seconds without an answer before the link is "
                                            "taken as down")
    give_up_after: float = Field(600.0, gt=0,
                                 description="seconds the link may be down before the journal "
                                             "is dropped for changed-block tracking")
    nbd_address: str | None = Field(None, description="HOST:PORT of the remote device's NBD "
                                                      "server, if not the one it reports")
    tls_ca: str | None = Field(None, description="CA file to verify the remote device with")
    tls_cert: str | None = Field(None, description="this device's client certificate file")
    tls_key: str | None = Field(None, description="this device's client key file")


class ReplicaOf(BaseModel):
    source_device: str = Field(description="the source device's id")
    source_lu: str
    source_uuid: str


class PromoteRequest(BaseModel):
    gen: int | None = Field(None, description="make this generation the primary's data")


class RemoteResync(BaseModel):
    reverse: bool = Field(False, description="copy from the remote device to this one")
    force: bool = Field(False, description="even with hosts connected (reverse)")
