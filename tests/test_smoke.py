from tests.conftest import sha256


async def test_version_check(client):
    r = await client.get("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_push_pull_image(client, push):
    digest, body = await push.image("team/app", "v1", layers=[b"abc" * 1000])
    r = await client.get("/v2/team/app/manifests/v1")
    assert r.status == 200
    assert await r.read() == body
    assert r.headers["Docker-Content-Digest"] == digest == sha256(body)
    r = await client.get(f"/v2/team/app/blobs/{sha256(b'abc' * 1000)}")
    assert r.status == 200 and await r.read() == b"abc" * 1000
