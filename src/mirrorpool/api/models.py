"""Shapes of the control API's requests and answers."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from mirrorpool.device.device import LogicalUnit
from mirrorpool.sizes import parse_size


class LuCreate(BaseModel):
    name: str = Field(description="LU name: letters, digits, '.', '_', '-'")
    size: int | None = Field(None, description="bytes; '64M' style strings are accepted too")
    pool: int = Field(3, ge=0, le=64, description="backup pool size; 0 means no backups")
    backing: str | None = Field(None, description="existing file or block device to use")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_size(value)
        return value


class LuResize(BaseModel):
    size: int

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_size(value)
        return value


class LuInfo(BaseModel):
    name: str
    uuid: str
    size: int
    pool: int
    backing: str | None
    data_path: str
    connections: int
    created: float

    @classmethod
    def of(cls, lu: LogicalUnit) -> LuInfo:
        return cls(
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
    pid: int
    data_dir: str
    nbd: list[str]
    api: str
    uptime_seconds: float
    connections: int
    lus: list[LuInfo]


class ErrorBody(BaseModel):
    detail: str
