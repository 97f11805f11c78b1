"""The HTTP/JSON control API of a running device: shapes, lifecycle, and refusals (never 500)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import nbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.processes import DeviceProcess

MIB = 1 << 20
LU_FIELDS = {"name", "uuid", "size", "pool", "backing", "data_path", "connections", "created"}


def path(name: str, *rest: str) -> str:
    return "/".join([f"/v1/lus/{quote(name, safe='')}", *rest])


def assert_refusal(response: httpx.Response, *statuses: int) -> str:
    """A 4xx in ``statuses`` whose JSON body is {"detail": <a sentence>}."""
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"detail"}, body
    detail = body["detail"]
    assert isinstance(detail, str) and len(detail) >= 8, body
    assert "Traceback" not in detail
    return detail


def names(api: httpx.Client) -> list[str]:
    response = api.get("/v1/lus")
    assert response.status_code == 200
    return [lu["name"] for lu in response.json()]


def create(api: httpx.Client, name: str, size: object = MIB, pool: int = 0,
           **extra: object) -> dict:
    response = api.post("/v1/lus", json={"name": name, "size": size, "pool": pool, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# ---------------------------------------------------------------- the document


def test_openapi_lists_the_v1_paths(api: httpx.Client) -> None:
    response = api.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "mirrorpool control API"
    paths = doc["paths"]
    assert set(paths["/v1/lus"]) >= {"get", "post"}
    assert set(paths["/v1/lus/{name}"]) >= {"get", "delete"}
    assert "post" in paths["/v1/lus/{name}/resize"]
    assert "get" in paths["/v1/status"]
    assert all(p.startswith("/v1/") or p == "/metrics" for p in paths)
    # refusals are documented with their shape
    for status in ("404", "409"):
        assert status in paths["/v1/lus/{name}"]["delete"]["responses"]
    assert "detail" in doc["components"]["schemas"]["ErrorBody"]["properties"]


def test_docs_page_is_served(api: httpx.Client) -> None:
    response = api.get("/docs")
    assert response.status_code == 200 and "openapi.json" in response.text


def test_status(api: httpx.Client, device: DeviceProcess) -> None:
    body = api.get("/v1/status").json()
    assert body["pid"] == device.proc.pid  # type: ignore[union-attr]
    assert body["api"] == device.api
    assert f"nbd://127.0.0.1:{device.nbd_port}" in body["nbd"]
    assert isinstance(body["lus"], list)


# ---------------------------------------------------------------- lifecycle


def test_create_get_list_resize_delete(api: httpx.Client, lu_name: str,
                                       device: DeviceProcess) -> None:
    response = api.post("/v1/lus", json={"name": lu_name, "size": 2 * MIB, "pool": 0})
    assert response.status_code == 201
    lu = response.json()
    assert set(lu) >= LU_FIELDS
    assert (lu["name"], lu["size"], lu["pool"], lu["backing"], lu["connections"]) == (
        lu_name, 2 * MIB, 0, None, 0)
    assert len(lu["uuid"]) == 36

    got = api.get(path(lu_name))
    assert got.status_code == 200
    assert {k: got.json()[k] for k in LU_FIELDS} == {k: lu[k] for k in LU_FIELDS}
    assert lu_name in names(api)

    grown = api.post(path(lu_name, "resize"), json={"size": 5 * MIB})
    assert grown.status_code == 200
    assert grown.json()["size"] == 5 * MIB and grown.json()["uuid"] == lu["uuid"]
    assert api.get(path(lu_name)).json()["size"] == 5 * MIB
    h = nbd.NBD()
    h.connect_uri(device.uri(lu_name))
    assert h.get_size() == 5 * MIB
    h.shutdown()

    gone = api.delete(path(lu_name))
    assert gone.status_code == 204 and gone.content == b""
    assert_refusal(api.get(path(lu_name)), 404)
    assert lu_name not in names(api)


def test_create_takes_size_strings_and_defaults(api: httpx.Client, lu_name: str) -> None:
    response = api.post("/v1/lus", json={"name": lu_name, "size": "64M"})
    assert response.status_code == 201
    lu = response.json()
    assert lu["size"] == 64 * MIB
    assert lu["pool"] == 3  # the default pool
    assert lu["backing"] is None


def test_resize_takes_size_strings(api: httpx.Client, lu_name: str) -> None:
    create(api, lu_name)
    response = api.post(path(lu_name, "resize"), json={"size": "1.5M"})
    assert response.status_code == 200 and response.json()["size"] == 3 * MIB // 2


def test_create_on_a_backing_file(api: httpx.Client, lu_name: str, tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(3 * MIB))
    lu = create(api, lu_name, size=None, backing=str(backing))
    assert (lu["size"], lu["backing"], lu["data_path"]) == (3 * MIB, str(backing), str(backing))
    assert api.delete(path(lu_name)).status_code == 204
    assert backing.exists()


def test_list_is_sorted(api: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    made = [f"sort-{c}-{tag}" for c in "cab"]
    try:
        for name in made:
            create(api, name)
        listed = [n for n in names(api) if n in made]
        assert listed == sorted(made)
    finally:
        for name in made:
            api.delete(path(name))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("GET", "", None), ("DELETE", "", None), ("POST", "/resize", {"size": MIB})],
)
def test_unknown_lu_is_404(api: httpx.Client, method: str, suffix: str, body: object) -> None:
    response = api.request(method, "/v1/lus/no-such-lu" + suffix, json=body)
    assert assert_refusal(response, 404) == "no LU named 'no-such-lu'"


def test_duplicate_is_409_and_changes_nothing(api: httpx.Client, lu_name: str) -> None:
    first = create(api, lu_name, size=MIB, pool=1)
    response = api.post("/v1/lus", json={"name": lu_name, "size": 4 * MIB, "pool": 0})
    assert assert_refusal(response, 409) == f"an LU named '{lu_name}' already exists"
    after = api.get(path(lu_name)).json()
    assert {k: after[k] for k in LU_FIELDS - {"connections"}} == {
        k: first[k] for k in LU_FIELDS - {"connections"}}
    assert names(api).count(lu_name) == 1


def test_concurrent_creates_of_one_name(device: DeviceProcess, lu_name: str) -> None:
    statuses: list[int] = []

    def attempt() -> None:
        with httpx.Client(base_url=device.api, timeout=60) as client:
            r = client.post("/v1/lus", json={"name": lu_name, "size": MIB, "pool": 0})
            statuses.append(r.status_code)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [201] + [409] * 5


def test_backing_used_twice_is_409(api: httpx.Client, lu_name: str, tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(MIB))
    create(api, lu_name, size=None, backing=str(backing))
    other = lu_name + "-b"
    response = api.post("/v1/lus", json={"name": other, "backing": str(backing), "pool": 0})
    assert "already backs another LU" in assert_refusal(response, 409)
    assert other not in names(api)


def test_delete_while_connected_is_409_then_forced(
    api: httpx.Client, lu_name: str, device: DeviceProcess
) -> None:
    create(api, lu_name)
    h = nbd.NBD()
    h.connect_uri(device.uri(lu_name))
    try:
        h.pwrite(b"\x01" * 512, 0)
        detail = assert_refusal(api.delete(path(lu_name)), 409)
        assert "connected client" in detail and "--force" in detail
        assert lu_name in names(api)
        assert h.pread(512, 0) == b"\x01" * 512
        assert_refusal(api.delete(path(lu_name), params={"force": "maybe"}), 422)
        assert lu_name in names(api)
        response = api.delete(path(lu_name), params={"force": "true"})
        assert response.status_code == 204
        assert lu_name not in names(api)
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    finally:
        del h


BAD_CREATE_BODIES = [
    # (body, allowed statuses, a phrase of the detail)
    ({"name": "n", "size": "abc", "pool": 0}, (422,), "not a size"),
    ({"name": "n", "size": "12Q", "pool": 0}, (422,), "not a size"),
    ({"name": "n", "size": MIB, "pool": -1}, (422, 400), "pool"),
    ({"name": "n", "size": MIB, "pool": 65}, (422, 400), "pool"),
    ({"name": "n", "size": MIB, "pool": "three"}, (422,), "pool"),
    ({"name": "n", "size": MIB, "pool": 1.5}, (422,), "pool"),
    ({"name": "n", "size": 1.5, "pool": 0}, (422, 400), "size"),
    ({"name": "n", "size": [1], "pool": 0}, (422,), "size"),
    ({"name": "n", "size": {"bytes": 1}, "pool": 0}, (422,), "size"),
    ({"name": "n", "size": 1000, "pool": 0}, (400,), "multiple of 512"),
    ({"name": "n", "size": 0, "pool": 0}, (400,), "positive"),
    ({"name": "n", "size": -512, "pool": 0}, (400,), "positive"),
    ({"name": "n", "size": None, "pool": 0}, (400,), "size is needed"),
    ({"name": "n", "pool": 0}, (400,), "size is needed"),
    ({"size": MIB}, (422,), "name"),
    ({"name": 5, "size": MIB}, (422,), "name"),
    ({"name": None, "size": MIB}, (422,), "name"),
    ({"name": "", "size": MIB}, (400,), "not a valid LU name"),
    ({"name": "a@b", "size": MIB}, (400,), "not a valid LU name"),
    ({"name": "x:y", "size": MIB}, (400,), "not a valid LU name"),
    ({"name": "../etc", "size": MIB}, (400,), "not a valid LU name"),
    ({"name": "n" * 65, "size": MIB}, (400,), "not a valid LU name"),
    ({"name": "n", "backing": "relative.img", "pool": 0}, (400,), "absolute path"),
    ({"name": "n", "backing": "/nonexistent/x.img", "pool": 0}, (400,), "No such file"),
    ({"name": "n", "backing": "/dev/null", "pool": 0}, (400,), "neither a regular file"),
    ({"name": "n", "backing": 7, "pool": 0}, (422,), "backing"),
    ({"name": "n", "size": 2**62, "pool": 0}, (400,), "over the limit"),
]


@pytest.mark.parametrize(("body", "statuses", "phrase"), BAD_CREATE_BODIES,
                         ids=[repr(b[0])[:40] for b in BAD_CREATE_BODIES])
def test_bad_create_body(api: httpx.Client, body: dict, statuses: tuple[int, ...],
                         phrase: str) -> None:
    before = names(api)
    detail = assert_refusal(api.post("/v1/lus", json=body), *statuses)
    assert phrase in detail
    assert names(api) == before


@pytest.mark.parametrize(
    "raw", [b"not json", b"", b"[]", b"null", b'"n"', b'{"name": "n", "size": ', b"{}"],
)
def test_malformed_json_is_422(api: httpx.Client, raw: bytes) -> None:
    before = names(api)
    response = api.post("/v1/lus", content=raw, headers={"content-type": "application/json"})
    assert_refusal(response, 422)
    assert names(api) == before


@pytest.mark.parametrize(
    ("body", "statuses", "phrase"),
    [({"size": "abc"}, (422,), "not a size"),
     ({}, (422,), "size"),
     ({"size": None}, (422,), "size"),
     ({"size": MIB + 100}, (400,), "multiple of 512"),
     ({"size": MIB // 2}, (400,), "only growing"),
     ({"size": 0}, (400,), "only growing"),
     ({"size": -MIB}, (400,), "only growing")],
)
def test_bad_resize_body(api: httpx.Client, lu_name: str, body: dict,
                         statuses: tuple[int, ...], phrase: str) -> None:
    create(api, lu_name)
    detail = assert_refusal(api.post(path(lu_name, "resize"), json=body), *statuses)
    assert phrase in detail
    assert api.get(path(lu_name)).json()["size"] == MIB


def test_unknown_path_and_method(api: httpx.Client) -> None:
    assert api.get("/v1/nothing").status_code == 404
    assert api.put("/v1/lus").status_code == 405


# ---------------------------------------------------------------- found bugs


def test_name_with_a_trailing_newline_is_refused(api: httpx.Client, lu_name: str) -> None:
    name = lu_name + "\n"
    try:
        response = api.post("/v1/lus", json={"name": name, "size": MIB, "pool": 0})
        assert_refusal(response, 400, 422)
        assert name not in names(api)
    finally:
        api.delete(path(name), params={"force": True})


@pytest.mark.parametrize("size", [2**63, 10**30, "9999999P"], ids=["2**63", "10**30", "9999999P"])
def test_create_with_an_absurd_size_is_a_refusal(api: httpx.Client, lu_name: str,
                                                 size: object) -> None:
    response = api.post("/v1/lus", json={"name": lu_name, "size": size, "pool": 0})
    assert_refusal(response, 400, 422)


@pytest.mark.parametrize("size", [2**62, 10**30], ids=["2**62", "10**30"])
def test_resize_to_an_absurd_size_is_a_refusal(api: httpx.Client, lu_name: str,
                                               size: int) -> None:
    create(api, lu_name)
    response = api.post(path(lu_name, "resize"), json={"size": size})
    assert_refusal(response, 400, 422)
    assert api.get(path(lu_name)).json()["size"] == MIB


def test_backing_with_a_nul_byte_is_a_refusal(api: httpx.Client, lu_name: str) -> None:
    response = api.post("/v1/lus", json={"name": lu_name, "backing": "/tmp/a\x00b", "pool": 0})
    assert_refusal(response, 400, 422)


# ---------------------------------------------------------------- any body at all

# Bodies of every shape, valid or not, so
# that this test guards everything else.
_sizes = st.one_of(
    st.none(),
    st.integers(min_value=-(2**40), max_value=64 * MIB),
    st.sampled_from([512, 4096, MIB, "1M", "64K"]),
    st.text(alphabet="0123456789 .KMGkmgiBbQx-", max_size=7),
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    st.booleans(),
    st.lists(st.integers(0, 9), max_size=2),
)
_names = st.one_of(
    st.text(max_size=70),
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,10}\Z"),
    st.sampled_from(["a@b", "x:y", "", ".", "..", "a/b"]),
    st.integers(),
    st.none(),
)
_pools = st.one_of(st.integers(-5, 70), st.text(max_size=3), st.none(), st.floats(0, 5))
_backings = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=20),
    st.sampled_from(["/dev/null", "/tmp", "relative", "/nonexistent/x", "/dev/zero"]),
)
_bodies = st.fixed_dictionaries(
    {}, optional={"name": _names, "size": _sizes, "pool": _pools, "backing": _backings,
                  "extra": st.integers()},
)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies)
def test_any_create_body_is_answered_without_500(api: httpx.Client, body: dict) -> None:
    response = api.post("/v1/lus", json=body)
    if response.status_code == 201:
        lu = response.json()
        try:
            assert lu["name"] == body["name"]
            assert lu["size"] > 0 and lu["size"] % 512 == 0
            assert api.get(path(lu["name"])).status_code == 200
        finally:
            assert api.delete(path(lu["name"]), params={"force": True}).status_code == 204
    else:
        assert_refusal(response, 400, 404, 409, 422)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(min_size=1, max_size=40), size=_sizes)
def test_any_name_in_the_path_is_answered_without_500(api: httpx.Client, name: str,
                                                      size: object) -> None:
    if name in (".", ".."):
        return  # URL normalisation makes these other paths
    for response in (api.get(path(name)), api.post(path(name, "resize"), json={"size": size}),
                     api.delete(path(name))):
        # names with '/' reach other routes: 404, or 405 for a method that route lacks
        assert_refusal(response, 404, 405, 422)
