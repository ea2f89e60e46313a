"""Downloads on the instance: resumed after a cut, kept only with the right sha256 (a real HTTP
server on 127.0.0.1 that honours Range, and one that cuts the first answer short)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer.fetch import fetch

pytestmark = pytest.mark.unit
PAYLOAD = os.urandom(3_000_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class RangeServer(BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; the first `cut` answers stop half-way."""

    cut = 0
    ranges: list = []

    def do_GET(self) -> None:
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
        type(self).ranges.append(start)
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut > 0:
            type(self).cut -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the rest never comes
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def url():
    RangeServer.ranges = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/weights.bin"
    httpd.shutdown()
    httpd.server_close()


def test_a_cut_download_resumes_where_it_stopped_and_verifies(url, tmp_path):
    RangeServer.cut = 1
    out = tmp_path / "w" / "weights.bin"
    result = fetch(url, out, DIGEST, retries=3, timeout=10)
    assert out.read_bytes() == PAYLOAD and result["sha256"] == DIGEST
    assert RangeServer.ranges[0] == 0 and 0 < RangeServer.ranges[1] < len(PAYLOAD)
    assert not (tmp_path / "w" / "weights.bin.part").exists()
    again = fetch(url, out, DIGEST)
    assert again["downloaded"] == 0 and len(RangeServer.ranges) == 2  # already there: not fetched


def test_a_wrong_hash_is_discarded_and_nothing_takes_the_name(url, tmp_path):
    RangeServer.cut = 0
    out = tmp_path / "weights.bin"
    with pytest.raises(ValueError, match="the download was discarded"):
        fetch(url, out, "0" * 64, retries=1)
    assert not out.exists() and not (tmp_path / "weights.bin.part").exists()


def test_record_writes_what_was_fetched_without_the_urls_query(url, tmp_path):
    from trainer.fetch import main

    RangeServer.cut = 0
    record = tmp_path / "out" / "downloads.jsonl"
    signed = url + "?X-Signature=s3cr3t#part"  # a signed URL: the query is a credential
    argv = [signed, "--out", str(tmp_path / "weights.bin"), "--sha256", DIGEST, "--record", str(record)]
    assert main(argv) == 0 and main(argv) == 0  # the second finds the file: recorded again
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines[0] == {
        "url": url,
        "path": str(tmp_path / "weights.bin"),
        "sha256": DIGEST,
        "bytes": len(PAYLOAD),
    }
    assert lines[1] == lines[0] and "s3cr3t" not in record.read_text()


def test_public_url_drops_user_info_query_and_fragment():
    from trainer.fetch import public_url

    assert (
        public_url("https://me:pw@host.example:8443/a/b.bin?sig=x#f") == "https://host.example:8443/a/b.bin"
    )
