"""Errors the controller raises; the API and CLI turn them into plain sentences."""


class MirrorpoolError(Exception):
    """Base of every refusal a user can cause."""

    http_status = 400


class InvalidRequest(MirrorpoolError):
    http_status = 400


class Forbidden(MirrorpoolError):
    http_status = 403


class NotFound(MirrorpoolError):
    http_status = 404


class Conflict(MirrorpoolError):
    http_status = 409


class DeviceBusy(MirrorpoolError):
    """The data directory or a port belongs to something else."""

    http_status = 409
