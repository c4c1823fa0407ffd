"""The fault proxy itself, driven by boto3 against the real moto S3 server on loopback.

Shows that each fault reaches the client as the real failure would (reset, 5xx, throttle,
truncated body, slow answer), that boto3's retries absorb transient faults, and that a persistent
fault surfaces as an error naming the object.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import botocore.exceptions
import pytest
from fault_fixtures import (
    fault_proxy_fixture,  # noqa: F401 - the "fault_proxy" fixture
    make_s3_client,
)
from faultproxy import FaultProxy, FaultRule, classify

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3_server):
    name = f"fp-{uuid.uuid4().hex[:12]}"
    make_s3_client(s3_server).create_bucket(Bucket=name)
    return name


def test_passthrough_counts_operations(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url)
    s3.put_object(Bucket=bucket, Key="a/b c/ü.txt", Body=b"hello")
    assert s3.get_object(Bucket=bucket, Key="a/b c/ü.txt")["Body"].read() == b"hello"
    assert (
        s3.get_object(Bucket=bucket, Key="a/b c/ü.txt", Range="bytes=1-2")["Body"].read() == b"el"
    )
    assert s3.head_object(Bucket=bucket, Key="a/b c/ü.txt")["ContentLength"] == 5
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a/b c/ü.txt"]
    s3.delete_object(Bucket=bucket, Key="a/b c/ü.txt")
    req = fault_proxy.stats()["requests"]
    for op in ("put", "get", "ranged_get", "head", "list", "delete"):
        assert req.get(op, 0) >= 1, (op, req)


def test_resets_on_listing_are_retried(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=5)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    rule = fault_proxy.add("reset", op="list", first=2)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]
    assert (rule.matched, rule.injected) == (3, 2)


def test_reset_without_retries_is_a_connection_error(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=1)
    fault_proxy.add("reset", op="list")
    with pytest.raises(
        (botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)
    ):
        s3.list_objects_v2(Bucket=bucket)


@pytest.mark.parametrize(
    ("fault", "code"), [("500", "InternalError"), ("503", "SlowDown"), ("throttle", "Throttling")]
)
def test_server_errors_are_retried_then_succeed(fault_proxy, bucket, fault, code):
    s3 = make_s3_client(fault_proxy.url, max_attempts=4)
    rule = fault_proxy.add(fault, op=("put", "get"), first=2, retry_after=0)
    s3.put_object(Bucket=bucket, Key="obj", Body=b"payload")  # 2 faults, then the 3rd try lands
    assert s3.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"payload"
    assert rule.injected == 2 and rule.matched == 4
    # The same fault, persistent: the client gives up with the S3 error code and the operation.
    fault_proxy.add(fault, op="get", path=r"/obj$", retry_after=0)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket=bucket, Key="obj")
    assert err.value.response["Error"]["Code"] == code
    assert "GetObject" in str(err.value)


def test_throttle_429_sends_retry_after(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=1)
    s3.put_object(Bucket=bucket, Key="t", Body=b"x")
    fault_proxy.add("throttle", op="get", status=429, retry_after=7)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket=bucket, Key="t")
    resp = err.value.response
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert resp["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "7"


def test_persistent_fault_names_the_object(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=3)
    s3.put_object(Bucket=bucket, Key="good", Body=b"g")
    s3.put_object(Bucket=bucket, Key="bad one.svs", Body=b"b")
    rule = fault_proxy.add("500", op="get", path=r"/bad one\.svs$")
    assert s3.get_object(Bucket=bucket, Key="good")["Body"].read() == b"g"
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket=bucket, Key="bad one.svs")
    assert err.value.response["Error"]["Resource"] == f"/{bucket}/bad one.svs"
    assert rule.matched == 3 and rule.injected == 3  # every attempt of the budget was faulted
    assert rule.injected_paths == [f"/{bucket}/bad one.svs"] * 3


def test_truncated_body_fails_a_read_and_managed_download_retries(fault_proxy, bucket, tmp_path):
    s3 = make_s3_client(fault_proxy.url)
    data = bytes(range(256)) * 400
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)
    fault_proxy.add("truncate", op="get", first=1, truncate_fraction=0.3)
    with pytest.raises(
        (botocore.exceptions.IncompleteReadError, botocore.exceptions.ResponseStreamingError)
    ):
        s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    rule = fault_proxy.add("truncate", op=("get", "ranged_get"), first=2, truncate_fraction=0.5)
    dest = tmp_path / "big.bin"
    s3.download_file(bucket, "big.bin", str(dest))  # s3transfer retries incomplete reads
    assert dest.read_bytes() == data
    assert rule.injected == 2


def test_slow_response_hits_read_timeout_then_retry_succeeds(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=3, read_timeout=0.5)
    s3.put_object(Bucket=bucket, Key="slow", Body=b"s")
    rule = fault_proxy.add("delay", op="get", first=1, delay_s=1.5)
    t0 = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="slow")["Body"].read() == b"s"
    assert time.monotonic() - t0 >= 0.5
    assert rule.injected == 1


def test_multipart_upload_survives_part_faults(fault_proxy, bucket, tmp_path):
    from boto3.s3.transfer import TransferConfig

    s3 = make_s3_client(fault_proxy.url, max_attempts=5)
    src = tmp_path / "multi.bin"
    data = (b"0123456789abcdef" * 65536) * 11  # 11 MiB -> 3 parts of 5 MiB
    src.write_bytes(data)
    rule = fault_proxy.add("reset", op="multipart", method="PUT", every=2)
    cfg = TransferConfig(
        multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, max_concurrency=2
    )
    s3.upload_file(str(src), bucket, "multi.bin", Config=cfg)
    assert s3.get_object(Bucket=bucket, Key="multi.bin")["Body"].read() == data
    assert rule.injected >= 1
    assert (
        fault_proxy.stats()["requests"]["multipart"] >= 5
    )  # create + 3 parts (+ retries) + complete
    # The managed download of the same object: parallel ranged GETs, some failing or cut short.
    slow = fault_proxy.add("503", op="ranged_get", every=2, name="ranged 503")
    cut = fault_proxy.add("truncate", op="ranged_get", first=1, name="ranged truncated")
    dest = tmp_path / "back.bin"
    s3.download_file(bucket, "multi.bin", str(dest), Config=cfg)
    assert dest.read_bytes() == data
    assert slow.injected >= 1 and cut.injected == 1


def test_triggers_are_deterministic():
    def decisions(**kw):
        r = FaultRule("500", **kw)
        return [r._decide() for _ in range(20)]

    assert decisions(first=3) == [True] * 3 + [False] * 17
    assert decisions(every=4) == [(i + 1) % 4 == 0 for i in range(20)]
    assert decisions(probability=0.5, seed=7) == decisions(probability=0.5, seed=7)
    assert decisions(probability=0.5, seed=7) != decisions(probability=0.5, seed=8)
    assert sum(decisions(limit=5)) == 5
    with pytest.raises(ValueError, match="fault"):
        FaultRule("boom")
    with pytest.raises(ValueError, match="op"):
        FaultRule("500", op="gett")
    with pytest.raises(ValueError, match="first/every/probability"):
        FaultRule("500", first=1, every=2)


def test_classify():
    h = {"Range": "bytes=0-9"}
    assert classify("GET", "/b", "list-type=2&prefix=x", {}) == "list"
    assert classify("GET", "/b/", "", {}) == "list"
    assert classify("GET", "/b", "location", {}) == "bucket"
    assert classify("GET", "/b/k", "", {}) == "get"
    assert classify("GET", "/b/k", "", h) == "ranged_get"
    assert classify("PUT", "/b/k", "", {}) == "put"
    assert classify("PUT", "/b/k", "partNumber=1&uploadId=u", {}) == "multipart"
    assert classify("POST", "/b/k", "uploads", {}) == "multipart"
    assert classify("POST", "/b", "delete", {}) == "delete"
    assert classify("HEAD", "/b/k", "", {}) == "head"
    assert classify("PUT", "/b", "", {}) == "bucket"


def test_concurrent_clients_counters_are_consistent(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=10)
    for i in range(8):
        s3.put_object(Bucket=bucket, Key=f"c{i}", Body=str(i).encode())
    fault_proxy.clear()
    rule = fault_proxy.add("503", op="get", probability=0.3, seed=1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        c = make_s3_client(fault_proxy.url, max_attempts=10)
        try:
            for _ in range(10):
                assert c.get_object(Bucket=bucket, Key=f"c{i}")["Body"].read() == str(i).encode()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:1]
    stats = fault_proxy.stats()
    assert rule.matched == stats["requests"]["get"] == 80 + rule.injected
    assert rule.injected > 0


def test_start_stop_cleanly(s3_server):
    proxy = FaultProxy(s3_server)
    with proxy:
        assert proxy.start() is proxy  # idempotent
        port = proxy.port
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    proxy.stop()  # twice is fine
    with pytest.raises(RuntimeError, match="not running"):
        _ = proxy.url
    with pytest.raises(ValueError, match="upstream"):
        FaultProxy("127.0.0.1:9000")


def test_access_denied_is_not_retried(fault_proxy, bucket):
    s3 = make_s3_client(fault_proxy.url, max_attempts=5)
    rule = fault_proxy.add("403", op="put")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.put_object(Bucket=bucket, Key="denied", Body=b"x")
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    assert rule.matched == 1  # a permanent error: one try only
