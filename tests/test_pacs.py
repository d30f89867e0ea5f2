"""Tests for pacs.py: the DICOMweb client and rotating cache, against a real Orthanc (Debian's
orthanc + orthanc-dicomweb) on loopback behind a recording, fault-injecting proxy written here. CPU,
loopback only.

The Orthanc tests skip, with the reason, only where Orthanc is not installed; .ci/run installs it,
so CI runs them. Every request loop is bounded in count and time (few retries, short backoff,
timeouts of seconds)."""
import base64
import csv
import email.parser
import hashlib
import http.client
import http.server
import itertools
import json
import math
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

import data
import dicom
import model
import pacs
import phantoms
import probe
import utils

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD, TOKEN = "radiology", "pw-Zq81-never-logged", "tok-Hh27-never-logged"
PLUGIN_DIRS = ["/usr/share/orthanc/plugins", "/usr/lib/orthanc"]
SHAPE = (6, 64, 48)  # one native instance is ~37 KB


# ----------------------------------------------------------------------- pieces that need no server
def test_multipart_parser_matches_email_oracle():
    """Our streaming parser against the standard library's MIME parser, with reads as small as 1
    byte so the delimiter straddles reads, and payloads ending in CR/LF/space bytes (which must not
    be stripped)."""
    rng = random.Random(0)
    for trial in range(30):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000))) + rng.choice(
            [b"", b"\r\n", b" \r", b"\n\n", b"--"])
        boundary = f"b{trial}-{rng.getrandbits(64):x}"
        body = (f"preamble\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + payload +
                f"\r\n--{boundary}--\r\n".encode())
        oracle = email.parser.BytesParser().parsebytes(
            f'Content-Type: multipart/related; boundary="{boundary}"\r\n\r\n'.encode() + body)
        expected = oracle.get_payload()[0].get_payload(decode=True)
        step = rng.choice([1, 7, 64, 100000])  # bytes per read
        pos, out = 0, bytearray()

        def read(n):
            nonlocal pos
            chunk = body[pos:pos + min(n, step)]
            pos += len(chunk)
            return chunk

        headers = pacs.copy_single_part(read, out.extend, boundary.encode())
        assert bytes(out) == expected == payload and headers["content-type"] == "application/dicom"
    # truncated: worth another try
    with pytest.raises(pacs._Transient, match="closed before the end"):
        chunks = iter([body[:len(body) // 2], b""])
        pacs.copy_single_part(lambda n: next(chunks), out.extend, boundary.encode())
    typed = 'multipart/related; type="application/dicom"; boundary="a:b"'
    assert pacs.multipart_boundary(typed) == b"a:b"
    assert pacs.multipart_boundary("multipart/related; boundary=xyz; type=x") == b"xyz"
    assert pacs.multipart_boundary("application/dicom") is None


def test_retry_after_and_urls():
    assert pacs.retry_after("3") == 3.0
    assert pacs.retry_after(None) is None and pacs.retry_after("soon") is None
    # RFC 9110's HTTP-date form, 90 s after `now`
    assert pacs.retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111687.0) == pytest.approx(90.0)
    want = ("https", "pacs.example.org", 443, "/dicom-web")
    assert pacs.parse_url("dicomweb+https://pacs.example.org/dicom-web/") == want
    assert pacs.redact("dicomweb+https://u:p@h:1/x?token=t") == "dicomweb+https://h:1/x"
    # passwords typed unencoded: '/' ends urlsplit's netloc early, '@' and '?' split it elsewhere
    for typed in ["u:se/cret@h:1/x", "u:P@secret@h:1/x", "u:se?cret@h:1/x", "u:se#cret@h:1/x"]:
        assert pacs.redact("dicomweb+https://" + typed) == "dicomweb+https://h:1/x"
    for bad, match in [("dicomweb+https://u:secret@h/x", "no credentials in the URL"),
                       ("http://h/x", "not a dicomweb"), ("dicomweb+http://h/x?k=1", "no query"),
                       ("dicomweb+https://u:se/cret@h/x", "no credentials"),
                       ("dicomweb+https://u:P@secret@h/x", "no credentials in the URL")]:
        with pytest.raises(ValueError, match=match) as e:
            pacs.parse_url(bad)
        assert "cret" not in str(e.value)  # no part of any password


def test_credentials(tmp_path):
    env = {"DICOMWEB_USER": USER, "DICOMWEB_PASSWORD": PASSWORD, "HOME": "/x"}
    basic = pacs.load_credentials(environ=env)
    assert basic.header == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    # the token wins
    bearer = pacs.load_credentials(environ={"DICOMWEB_TOKEN": TOKEN, "DICOMWEB_USER": USER})
    assert bearer.header == f"Bearer {TOKEN}"
    assert PASSWORD not in repr(basic) + str(basic) and TOKEN not in repr(bearer) + f"{bearer}"
    assert pacs.load_credentials(environ={}) is None
    with pytest.raises(ValueError, match="set together"):
        pacs.load_credentials(environ={"DICOMWEB_USER": USER})
    with pytest.raises(ValueError, match="line break"):
        pacs.load_credentials(environ={"DICOMWEB_TOKEN": "a\r\nX-Evil: 1"})
    secret = tmp_path / "dicomweb.env"
    secret.write_text(f"# site PACS\nDICOMWEB_TOKEN={TOKEN}\n")
    secret.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        pacs.load_credentials(secret)
    secret.chmod(0o600)
    assert pacs.load_credentials(secret).header == f"Bearer {TOKEN}"
    secret.write_text(f"TOKEN={TOKEN}\n")
    with pytest.raises(ValueError, match="line 1") as e:
        pacs.load_credentials(secret)
    assert TOKEN not in str(e.value)  # a malformed line is named, never echoed
    inside = ROOT / f".h5-test-secret-{os.getpid()}"
    try:
        inside.write_text(f"DICOMWEB_TOKEN={TOKEN}\n")
        inside.chmod(0o600)
        with pytest.raises(ValueError, match="outside the repository"):
            pacs.load_credentials(inside)
    finally:
        inside.unlink()


def test_manifest_is_validated_and_is_the_allow_list(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID,view\n1.2.3,1.2.4,1.2.5,lcc\n")
    rows = pacs.read_manifest(m)
    assert rows[0]["view"] == "lcc"
    client = pacs.Client("dicomweb+http://127.0.0.1:9/x", rows,
                         pacs.Cache(tmp_path / "c", 10 ** 6, 0))
    with pytest.raises(ValueError, match="not in the manifest"):  # refused before any socket exists
        client.fetch(dict(StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.4",
                          SOPInstanceUID="9.9"))
    m.write_text("StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID\n1.2.3,1.2.4,../../studies\n")
    with pytest.raises(ValueError, match="line 2: SOPInstanceUID .* is not a DICOM UID"):
        pacs.read_manifest(m)
    m.write_text("StudyInstanceUID,SOPInstanceUID\n1.2,1.3\n")
    with pytest.raises(ValueError, match="missing: SeriesInstanceUID"):
        pacs.read_manifest(m)


def test_cache_lru_pins_and_crash_leftovers(tmp_path):
    cache = pacs.Cache(tmp_path, cap_bytes=3000, floor_bytes=0, wait_s=0.5)
    paths = [cache.path(f"k{i}") for i in range(4)]
    tokens = []
    for i, p in enumerate(paths[:3]):
        token, hit = cache.pin(p)
        assert not hit
        cache.write(p, lambda w: w(bytes([i]) * 1000))
        tokens.append(token)
        time.sleep(0.01)
    for t in tokens[1:]:
        cache.unpin(t)
    cache.pin(paths[1])  # a hit: paths[1] becomes the most recently used, paths[2] the least
    cache.write(paths[3], lambda w: w(b"x" * 1000))
    assert [p.exists() for p in paths] == [True, True, False, True]  # pinned 0 kept, LRU 2 evicted
    # skipped and counted, not a stop
    with pytest.raises(pacs.FetchError, match="more than --cache-bytes"):
        cache.write(cache.path("big"), lambda w: w(b"x" * 3001))
    held = [cache.pin(p)[0] for p in paths if p.exists()]  # every cached volume resident somewhere
    # waits wait_s, then says so
    with pytest.raises(pacs.CacheFull, match="no room for 1000 bytes"):
        cache.write(cache.path("k4"), lambda w: w(b"z" * 1000))
    assert all(p.exists() for p in paths if p != paths[2]) and not cache.path("k4").exists()
    for t in held:
        cache.unpin(t)
    # leftovers of a crashed process (a pid that cannot exist) do not count and are cleaned
    (paths[0].parent / f"{paths[0].name}.tmp.999999999.ab").write_bytes(b"y" * 5000)
    (cache.dir / "pins" / f"{paths[2].stem}.999999999.cd").touch()
    used, _, pinned = cache.usage()
    assert used == 3000 and not list(cache.dir.rglob("*.tmp.*")) and paths[2].stem not in pinned


# --------------------------------------------------------------------- a real Orthanc on loopback
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin():
    for d in PLUGIN_DIRS:
        found = sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []
        if found:
            return found[0]
    return None


def _request(url, method="GET", body=None, auth=(USER, PASSWORD), timeout=10):
    host, port = url.split("/")[2].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()}
    conn.request(method, "/" + url.split("/", 3)[3], body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with authentication and the DICOMweb plugin on a free loopback port, throwaway
    storage."""
    plugin = _plugin()
    if shutil.which("Orthanc") is None or plugin is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc "
                    "orthanc-dicomweb; CI installs both)")
    root, port = tmp_path_factory.mktemp("orthanc"), _free_port()
    config = dict(Name="dbt-dino-test", StorageDirectory=str(root / "db"),
                  IndexDirectory=str(root / "db"),
                  HttpPort=port, DicomServerEnabled=False, RemoteAccessAllowed=False,
                  AuthenticationEnabled=True,
                  RegisteredUsers={USER: PASSWORD}, Plugins=[str(plugin)],
                  HttpCompressionEnabled=False, DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):  # up to 15 s to start
            try:
                if _request(url + "/system", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.kill()  # throwaway storage: no need for Orthanc's 2.5 s graceful shutdown
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory):
    """Phantom BTO instances uploaded through Orthanc's REST API: 12 native + 2 JPEG 2000 in the
    manifest, and one study outside it. Returns (manifest rows, original files by SOP UID, the
    outside study's UIDs, manifest path)."""
    root = tmp_path_factory.mktemp("phantoms")
    rows, files = [], {}
    for i, enc in enumerate(["j2k", "j2k"] + ["native"] * 13):
        path = phantoms.write_phantom_dicom(root / f"{i}.dcm", SHAPE, encoding=enc, seed=i)
        status, answer = _request(orthanc + "/instances", "POST", path.read_bytes())
        assert status == 200, answer
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = {c: str(ds[c].value) for c in pacs.UID_COLUMNS}
        rows.append(uids | {"encoding": enc, "path": str(path)})
        files[rows[-1]["SOPInstanceUID"]] = path
    outside = rows.pop()  # uploaded, visible to anyone who asks, but not in the manifest
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows, files, outside, manifest


class Proxy(http.server.ThreadingHTTPServer):
    """Loopback reverse proxy in front of Orthanc that records every request and injects faults.

    plan[sop_uid]: actions for the next requests of that instance ("503", "503:<Retry-After>",
    "drop", "truncate", "slow"); `always` applies to every request; stop_after: close the listening
    socket after that many forwards (a server that goes away mid-run). token: require this bearer
    token and forward with Orthanc's own account."""
    daemon_threads = True

    def __init__(self, upstream, token=None):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.token = upstream, token
        self.log, self.plan = [], {}
        self.always, self.stop_after = None, None
        self.forwards, self.lock = 0, threading.Lock()
        self.conns, self.stopped = set(), False
        threading.Thread(target=self.serve_forever, kwargs=dict(poll_interval=0.05),
                         daemon=True).start()

    @property
    def url(self):
        return f"dicomweb+http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def stop(self):
        threading.Thread(target=self.shutdown, daemon=True).start()
        self.socket.close()  # from now on: connection refused
        self.stopped = True
        for conn in list(self.conns):  # and the open keep-alive connections die too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real PACS front end

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.server.conns.add(self.connection)
        if self.server.stopped:
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.log.append(dict(path=self.path, accept=self.headers.get("Accept"),
                                auth=self.headers.get("Authorization"),
                                port=self.client_address[1]))
            sop = self.path.rsplit("/", 1)[-1]
            action = srv.plan[sop].pop(0) if srv.plan.get(sop) else srv.always
        if action == "drop":  # close without a byte of answer
            self.close_connection = True
            return
        if action and action.startswith("503"):
            self.send_response(503)
            self.send_header("Retry-After", action.partition(":")[2] or "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        auth = self.headers.get("Authorization")
        if srv.token is not None:  # the site's authenticating proxy: bearer in, service account out
            if auth != f"Bearer {srv.token}":
                self.send_error(401)
                return
            auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self._forward(action, auth)

    def _forward(self, action, auth):
        srv = self.server
        host, port = srv.upstream.split("/")[2].split(":")
        up = http.client.HTTPConnection(host, int(port), timeout=10)
        up.request("GET", self.path, headers={"Accept": self.headers.get("Accept", "*/*")} |
                   ({"Authorization": auth} if auth else {}))
        resp = up.getresponse()
        body = resp.read()
        self.send_response(resp.status)
        for k in ("Content-Type", "Retry-After"):
            if resp.getheader(k):
                self.send_header(k, resp.getheader(k))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if action == "truncate":  # a connection that dies mid-body
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        for i in range(0, len(body), 4096):
            self.wfile.write(body[i:i + 4096])
            if action == "slow":  # writers take long enough for readers to race them
                self.wfile.flush()
                time.sleep(0.005)
        with srv.lock:
            srv.forwards += 1
            if srv.stop_after is not None and srv.forwards >= srv.stop_after:
                srv.stop()


@pytest.fixture
def proxy(orthanc):
    p = Proxy(orthanc)
    yield p
    p.stop()


def _client(proxy, rows, cache_dir, cap=10 ** 7, **kw):
    creds = kw.pop("credentials", pacs.Credentials(
        "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), "basic"))
    kw = dict(timeout=5, retries=3, backoff=0.02, max_wait=2.0) | kw
    return pacs.Client(proxy.url, rows, pacs.Cache(cache_dir, cap, floor_bytes=0, wait_s=10),
                       creds, **kw)


def test_streamed_slices_equal_local_reads_and_nothing_outside_the_manifest(
        studies, proxy, tmp_path):
    rows, files, outside, _ = studies
    client = _client(proxy, rows, tmp_path)
    for row in rows[:4]:  # both JPEG 2000 instances and two native ones
        path, token = client.fetch(row)
        original = files[row["SOPInstanceUID"]]
        assert path.read_bytes() == original.read_bytes()  # stored transfer syntax, no transcoding
        remote, meta = dicom.read_dbt(path)
        local, _ = dicom.read_dbt(original)
        assert remote.dtype == np.float32 and np.array_equal(remote, local)  # bit for bit
        j2k = row["encoding"] == "j2k"
        syntax = "1.2.840.10008.1.2.4.90" if j2k else "1.2.840.10008.1.2.1"
        assert meta["transfer_syntax"] == syntax
        client.cache.unpin(token)
    assert client.fetch(rows[0])[0] and client.stats["hits"] == 1 and client.stats["misses"] == 4
    with pytest.raises(ValueError, match="not in the manifest"):
        client.fetch(outside)
    allowed = {f"/dicom-web/studies/{r['StudyInstanceUID']}/series/{r['SeriesInstanceUID']}"
               f"/instances/{r['SOPInstanceUID']}" for r in rows}
    assert len(proxy.log) == 4 and all(entry["path"] in allowed for entry in proxy.log)
    assert not any(outside["StudyInstanceUID"] in entry["path"] for entry in proxy.log)
    assert all("transfer-syntax=*" in entry["accept"] for entry in proxy.log)


def test_bearer_token_through_an_authenticating_proxy(studies, orthanc, tmp_path):
    rows, files, _, _ = studies
    gate = Proxy(orthanc, token=TOKEN)
    try:
        client = _client(gate, rows, tmp_path,
                         credentials=pacs.load_credentials(environ={"DICOMWEB_TOKEN": TOKEN}))
        path, _ = client.fetch(rows[5])
        assert path.read_bytes() == files[rows[5]["SOPInstanceUID"]].read_bytes()
        assert gate.log[0]["auth"] == f"Bearer {TOKEN}"
    finally:
        gate.stop()


def test_wrong_credentials_stop_at_once_with_one_line(studies, proxy, tmp_path):
    rows = studies[0]
    bad = pacs.load_credentials(environ={"DICOMWEB_USER": USER,
                                         "DICOMWEB_PASSWORD": "wrong-" + PASSWORD})
    client = _client(proxy, rows, tmp_path, credentials=bad, retries=5)
    t0 = time.monotonic()
    with pytest.raises(pacs.AuthError) as e:
        list(client.prefetch(rows, ahead=3))
    message = str(e.value)
    assert "HTTP 401" in message and "\n" not in message and PASSWORD not in message
    # no retries: at most the prefetched requests
    assert len(proxy.log) <= 4 and time.monotonic() - t0 < 3
    assert not list(client.cache.dir.rglob("*.dcm"))


def test_faults_are_retried_then_skipped_not_a_crash(studies, proxy, tmp_path):
    rows, files, _, _ = studies
    sop = [r["SOPInstanceUID"] for r in rows]
    proxy.plan = {sop[0]: ["503:1"], sop[1]: ["drop", "truncate"], sop[2]: ["503"] * 10}
    client = _client(proxy, rows, tmp_path, retries=3)
    t0 = time.monotonic()
    path, _ = client.fetch(rows[0])  # 503 with Retry-After: 1, then served
    assert time.monotonic() - t0 >= 1.0 and path.read_bytes() == files[sop[0]].read_bytes()
    # a dropped connection, then a truncated body, then served whole
    path, _ = client.fetch(rows[1])
    assert path.read_bytes() == files[sop[1]].read_bytes()
    with pytest.raises(pacs.FetchError, match=f"instance {sop[2]}: HTTP 503.*3 tries"):
        client.fetch(rows[2])
    assert client.stats["retries"] == 1 + 2 + 2
    assert [e["path"].rsplit("/", 1)[1]
            for e in proxy.log] == [sop[0]] * 2 + [sop[1]] * 3 + [sop[2]] * 3
    assert not list(client.cache.dir.rglob("*.tmp.*"))  # failed attempts leave nothing behind

    proxy.stop_after = proxy.forwards + 2  # the server goes away after two more instances
    t0, retries = time.monotonic(), client.stats["retries"]
    served = [path is not None for _, path, _ in client.prefetch(rows[3:9], ahead=1)]
    n = sum(served)  # two in flight: which of them the server answers before it goes is a race
    assert n in (2, 3) and served[-3:] == [False] * 3
    assert client.stats["retries"] - retries == 2 * (6 - n) and time.monotonic() - t0 < 20


def test_a_long_retry_after_and_an_instance_over_the_cap_are_skipped_not_hurried_or_fatal(
        studies, proxy, tmp_path):
    rows, files, _, _ = studies
    sop = [r["SOPInstanceUID"] for r in rows]
    # the server asks for 30 s, the client waits at most 2 s: no early retry
    proxy.plan = {sop[0]: ["503:30"]}
    client = _client(proxy, rows, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(pacs.FetchError,
                       match=f"instance {sop[0]}: HTTP 503.*retry after 30 s, more than the 2 s"):
        client.fetch(rows[0])
    assert time.monotonic() - t0 < 2
    assert [e["path"].rsplit("/", 1)[1] for e in proxy.log] == [sop[0]]
    sizes = [files[s].stat().st_size for s in sop[:4]]
    # two JPEG 2000 instances, far smaller than two native ones
    fits = [r["encoding"] == "j2k" for r in rows[:4]]
    # halfway: the native instances (with their multipart headers) can never be cached, the rest can
    largest_fit = max(n for n, f in zip(sizes, fits) if f)
    client.cache.cap = (largest_fit + min(n for n, f in zip(sizes, fits) if not f)) // 2
    assert any(fits) and not all(fits)
    got = []
    for row, path, token in client.prefetch(rows[:4], ahead=0):
        got.append(path is not None)
        if path is not None:
            client.cache.unpin(token)
    assert got == fits  # skipped like a failed fetch; the stream goes on


def test_cache_never_exceeds_its_cap_while_serving_four_times_more(studies, proxy, tmp_path):
    rows, files, _, _ = studies
    native = [r for r in rows if r["encoding"] == "native"]
    size = files[native[0]["SOPInstanceUID"]].stat().st_size
    cap = int(2.6 * size)  # two resident volumes (the one in use + one prefetched) and a little
    client = _client(proxy, native, tmp_path, cap=cap)
    peak, done = [0], threading.Event()

    # everything on disk under the cache, finished or not, listed while nothing is renamed
    def watch():
        while not done.is_set():
            with client.cache.locked():
                peak[0] = max(peak[0], sum(p.stat().st_size
                                           for p in client.cache.dir.rglob("*.dcm*")))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    served = 0
    try:
        for _ in range(2):  # two epochs: the second finds the first's volumes evicted
            for row, path, token in client.prefetch(native, ahead=1):
                assert path.read_bytes() == files[row["SOPInstanceUID"]].read_bytes()
                served += path.stat().st_size
                client.cache.unpin(token)  # the volume retires
    finally:
        done.set()
        watcher.join()
    assert served >= 4 * cap and 0 < peak[0] <= cap
    assert client.stats["misses"] == 2 * len(native) and client.stats["bytes"] == served


WORKER = """
import hashlib, json, sys, pacs
rows, expected, cache_dir, url, cap = json.loads(sys.argv[1])
cache = pacs.Cache(cache_dir, cap, floor_bytes=0, wait_s=10)
client = pacs.Client(url, rows, cache, pacs.load_credentials(), timeout=5, retries=3, backoff=0.02)
for row, path, token in client.prefetch(rows, ahead=1):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == expected[row["SOPInstanceUID"]], "partial or wrong file"
    cache.unpin(token)
print(json.dumps(client.stats))
"""


def test_two_processes_sharing_a_cache_never_read_a_partial_file(studies, proxy, tmp_path):
    rows, files, _, _ = studies
    native = [r for r in rows if r["encoding"] == "native"]
    expected = {r["SOPInstanceUID"]: hashlib.sha256(files[r["SOPInstanceUID"]].read_bytes())
                .hexdigest() for r in native}
    proxy.always = "slow"  # ~0.05 s per instance, so writes overlap reads
    # room for what both pin at once (the volume in use + one prefetched, each), a third of the
    # data: evictions too
    cap = int(4.5 * files[native[0]["SOPInstanceUID"]].stat().st_size)
    env = dict(os.environ, DICOMWEB_USER=USER, DICOMWEB_PASSWORD=PASSWORD)
    args = [[order, expected, str(tmp_path), proxy.url, cap] for order in (native, native[::-1])]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(a)], cwd=ROOT, env=env,
                              text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in args]
    seen = {}  # a third reader that opens every finished file it can see while they write
    while any(p.poll() is None for p in procs):
        for path in (tmp_path / "dicomweb").glob("*/*.dcm"):
            try:
                seen[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:  # evicted between the listing and the read
                continue
            assert seen[path] in expected.values()
        time.sleep(0.002)
    outs = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    stats = [json.loads(out) for out, _ in outs]
    assert sum(s["hits"] + s["misses"] for s in stats) == 2 * len(native) and len(seen) >= 3
    assert not list((tmp_path / "dicomweb").rglob("*.tmp.*"))


def test_https_verified_by_default_and_with_a_ca_bundle(studies, orthanc, tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (Debian: apt-get install "
                    "openssl)")
    rows, files, _, _ = studies
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    gate = Proxy(orthanc)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    gate.socket = context.wrap_socket(gate.socket, server_side=True)
    url = gate.url.replace("dicomweb+http:", "dicomweb+https:")
    creds = pacs.load_credentials(environ={"DICOMWEB_USER": USER, "DICOMWEB_PASSWORD": PASSWORD})
    try:
        untrusted = pacs.Client(url, rows, pacs.Cache(tmp_path / "a", 10 ** 7, 0), creds,
                                timeout=5, retries=3)
        with pytest.raises(pacs.AuthError, match="certificate not trusted.*--dicomweb-ca-bundle"):
            untrusted.fetch(rows[0])
        trusted = pacs.Client(url, rows, pacs.Cache(tmp_path / "b", 10 ** 7, 0), creds,
                              ca_bundle=cert, timeout=5)
        path, _ = trusted.fetch(rows[0])
        assert path.read_bytes() == files[rows[0]["SOPInstanceUID"]].read_bytes()
    finally:
        gate.stop()


def test_connections_are_opened_after_fork(studies, proxy, tmp_path):
    import multiprocessing
    rows = studies[0]
    client = _client(proxy, rows, tmp_path)
    client.fetch(rows[0])  # the parent opens a keep-alive connection

    def child():  # a loader worker: fork inherits the client, never its socket
        client.fetch(rows[1])

    worker = multiprocessing.get_context("fork").Process(target=child)
    worker.start()
    worker.join(20)
    client.fetch(rows[2])  # the parent's own connection, still open, serves it
    ports = [e["port"] for e in proxy.log]
    assert worker.exitcode == 0 and len(ports) == 3 and ports[0] == ports[2] != ports[1]


def test_pretrain_stream_from_the_server_equals_the_local_stream(
        studies, proxy, tmp_path, monkeypatch):
    """The training samples themselves, remote vs local, with a cache far smaller than the data."""
    rows, files, _, manifest = studies
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path))
    monkeypatch.setenv("DICOMWEB_USER", USER)
    monkeypatch.setenv("DICOMWEB_PASSWORD", PASSWORD)
    cap = int(4.5 * max(f.stat().st_size for f in files.values()))  # the data is ~3x this
    kw = dict(global_size=56, local_size=28, n_local=2, seed=3, slices_per_volume=2,
              shuffle_buffer=4)
    remote = data.PretrainStream(proxy.url, **kw,
                                 dicomweb=dict(manifest=manifest, cache_bytes=cap, floor_bytes=0))
    # the same manifest's `path` column: the original files
    local = data.PretrainStream(manifest, **kw)
    n = 3 * len(rows)  # every volume served, most of them more than once
    for a, b in zip(itertools.islice(remote, n), itertools.islice(local, n)):
        assert a["volume"] == b["volume"] and torch.equal(a["global_crops"], b["global_crops"])
        assert torch.equal(a["local_crops"], b["local_crops"])
    url = "/dicom-web/studies/{}/series/{}/instances/{}"
    allowed = {url.format(*(r[c] for c in pacs.UID_COLUMNS)) for r in rows}
    assert {e["path"] for e in proxy.log} == allowed  # every volume fetched, nothing else asked for
    report = remote.cache_report()
    total = sum(f.stat().st_size for f in files.values())
    assert 0 <= report["cache_hit"] < 1 and report["fetched_gb"] * 1e9 >= total * 12 / 15
    assert sum(p.stat().st_size for p in (tmp_path / "dicomweb").rglob("*.dcm*")) <= cap
    # the stream above still pins its volumes
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path / "small"))
    # the size check knows the first volume's size
    first = 3 * files[rows[0]["SOPInstanceUID"]].stat().st_size
    tight = dict(manifest=manifest, cache_bytes=first - 1, floor_bytes=0)
    small = data.PretrainStream(proxy.url, **kw, dicomweb=tight)
    # in use + 2 prefetched
    with pytest.raises(ValueError, match="cannot hold the 3 volumes resident at once"):
        next(iter(small))


def _pretrain(args, env, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--steps", "2",
                           "--log-every", "1", "--batch-size", "2", "--global-size", "56",
                           "--local-size", "28", "--eval-every", "0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_pretrain_end_to_end_with_a_token_that_is_never_written(studies, orthanc, tmp_path):
    rows, _, _, manifest = studies
    gate = Proxy(orthanc, token=TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMWEB_")}
    env.update(DICOMWEB_TOKEN=TOKEN, DBT_DINO_CACHE=str(tmp_path / "cache"))
    try:
        run = _pretrain(["--data", gate.url, "--manifest", str(manifest), "--out",
                         str(tmp_path / "run"), "--workers", "1", "--cache-bytes", "1M"], env)
    finally:
        gate.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cache_hit" in run.stdout and "fetched_gb" in run.stdout
    written = "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "run").rglob("*")
                      if p.is_file())
    assert gate.url.split("//")[1] in written  # args.json names the server ...
    # ... never the token, anywhere
    for secret in (TOKEN, base64.b64encode(TOKEN.encode()).decode()):
        assert secret not in written + run.stdout + run.stderr
    assert len(gate.log) >= 2 and all(e["auth"] == f"Bearer {TOKEN}" for e in gate.log)


def test_pretrain_with_a_wrong_password_says_one_line_and_stops(studies, proxy, tmp_path):
    manifest = studies[3]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMWEB_")}
    env.update(DICOMWEB_USER=USER, DICOMWEB_PASSWORD="wrong-" + PASSWORD,
               DBT_DINO_CACHE=str(tmp_path))
    run = _pretrain(["--data", proxy.url, "--manifest", str(manifest), "--out",
                     str(tmp_path / "run")], env)
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1
    assert lines[0].startswith("error: ") and "HTTP 401" in lines[0]
    assert PASSWORD not in run.stdout + run.stderr and len(proxy.log) == 1  # no retries
    assert not (tmp_path / "run").exists()  # nothing written before the inputs proved good


# ------------------------------------------------------------------- probe.py embed from the server
VIEWS = ("LCC", "RCC", "LMLO", "RMLO")


@pytest.fixture(scope="module")
def exam_tables(orthanc, tmp_path_factory):
    """A 4-patient synthetic archive (native, JPEG 2000 and RLE views, every display variant)
    uploaded to Orthanc. Returns (archive folder, the same exam table naming UIDs with splits, plus
    a fifth exam whose instances the server does not hold, the backbone file, that fifth exam's view
    cells)."""
    root = tmp_path_factory.mktemp("exams")
    archive = phantoms.synthetic_archive(root / "archive", patients=4, seed=11, shape=(4, 64, 48))
    with open(archive / "exams.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r, split in zip(rows, ("train", "train", "val", "test")):
        r["split"] = split
        for v in VIEWS:
            path = archive / r[v]
            status, answer = _request(orthanc + "/instances", "POST", path.read_bytes())
            assert status == 200, answer
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            r[v] = "/".join(str(ds[c].value) for c in pacs.UID_COLUMNS)
    uid = "1.2.826.0.1.3680043.10.99"  # valid UIDs, never uploaded: the server answers 404
    absent = {v: f"{uid}/{uid}.1/{uid}.1.{k}" for k, v in enumerate(VIEWS)}
    rows.append(dict(rows[0], patient="SYN-ABSENT", exam="1.2.826.0.1.3680043.10.99",
                     split="train", **absent))
    table = root / "exams-uids.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    torch.manual_seed(0)
    backbone = root / "backbone.pth"
    utils.save_checkpoint(backbone, model.build("tiny").state_dict())
    return archive, table, backbone, absent


def _probe(args, env, timeout=120):
    run = subprocess.run([sys.executable, str(ROOT / "probe.py"), *args, "--device", "cpu",
                          "--size", "28"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    info = None  # the JSON line `probe.py embed` ends with
    if run.returncode == 0 and args[0] == "embed":
        info = json.loads(run.stdout.strip().splitlines()[-1])
    return run, info


def _exam_features(folder, rows, root):
    """{exam: {view: {stat: (D,)}}} from the embedding cache files of `rows` (root None: a UID
    table)."""
    return {r["exam"]: torch.load(probe.exam_file(folder, r, root), weights_only=True)
            for r in rows}


def test_probe_embed_from_the_server_equals_local_and_reuses_its_cache(
        exam_tables, studies, orthanc, tmp_path):
    archive, table, backbone, absent = exam_tables
    outside = studies[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMWEB_")}
    flags = ["--backbone", str(backbone), "--chunk", "3"]
    local, local_info = _probe(["embed", "--data", str(archive), "--workers", "1", *flags],
                               dict(env, DBT_DINO_CACHE=str(tmp_path / "local")))
    assert local.returncode == 0, local.stderr[-3000:]
    gate = Proxy(orthanc, token=TOKEN)  # the site's authenticating proxy, recording every request
    remote_env = dict(env, DICOMWEB_TOKEN=TOKEN, DBT_DINO_CACHE=str(tmp_path / "remote"))
    try:  # one loader worker: the fetches happen in the forked worker, as at scale
        first, info = _probe(["embed", "--data", gate.url, "--manifest", str(table), "--workers",
                              "1", "--cache-bytes", "1M", *flags], remote_env)
    finally:
        gate.stop()
    assert first.returncode == 0, first.stderr[-3000:]
    assert (info["reused"], info["embedded"], info["skipped"]) == (0, 4,
                                                                   1) and info["source"] == gate.url

    # the same pixels through the same reader: the features equal those of the local archive
    with open(archive / "exams.csv", newline="") as fh:
        local_rows = list(csv.DictReader(fh))
    with open(table, newline="") as fh:
        uid_rows = list(csv.DictReader(fh))[:4]
    want = _exam_features(local_info["cache"], local_rows, archive)
    got = _exam_features(info["cache"], uid_rows, None)
    # same backbone key
    assert list(got) == list(want) and info["cache"].endswith(Path(local_info["cache"]).name)
    for exam in want:
        for v in VIEWS:
            for stat in probe.STATS:
                assert torch.allclose(got[exam][v][stat], want[exam][v][stat], rtol=0,
                                      atol=1e-6), (exam, v, stat)
    exams = list(want)
    assert not torch.allclose(want[exams[0]]["RCC"]["patch_mean"],
                              want[exams[1]]["RCC"]["patch_mean"], atol=1e-3)

    # only the table's instances were requested, each named once in the log when not fetched
    cells = {r[v] for r in uid_rows for v in VIEWS} | set(absent.values())
    allowed = {"/dicom-web/studies/{}/series/{}/instances/{}".format(*c.split("/")) for c in cells}
    assert {e["path"] for e in gate.log} == allowed
    assert all(e["auth"] == f"Bearer {TOKEN}" for e in gate.log)
    assert not any(outside["StudyInstanceUID"] in e["path"] for e in gate.log)
    assert all(first.stdout.count(cell.rsplit("/", 1)[1]) == 1
               for cell in absent.values()), first.stdout[-3000:]
    assert "4 embedded, 1 exams left out" in first.stdout

    # a density probe on the same table, through another proxy port: every exam reused, no pixels
    # requested
    gate = Proxy(orthanc, token=TOKEN)
    try:
        second, _ = _probe(["--task", "density", "--data", gate.url, "--manifest", str(table),
                            "--workers", "1",
                            "--trials", "1", "--epochs", "2", "--n-boot", "10", "--out",
                            str(tmp_path / "run"), *flags], remote_env)
    finally:
        gate.stop()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 reused, 0 embedded, 1 exams left out" in second.stdout
    retried = {"/dicom-web/studies/{}/series/{}/instances/{}".format(*c.split("/"))
               for c in absent.values()}
    # only what failed before is asked for again
    assert gate.log and {e["path"] for e in gate.log} == retried
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["n_test"] == 1 and report["exams_left_out"] == 1
    written = [p for d in (tmp_path / "remote", tmp_path / "run") for p in d.rglob("*")
               if p.is_file()]
    assert any(p.suffix == ".dcm" for p in written) and any(p.name == "args.json" for p in written)
    text = "".join(p.read_bytes().decode("latin-1") for p in written) + first.stdout + first.stderr
    for secret in (TOKEN, base64.b64encode(TOKEN.encode()).decode()):
        assert secret not in text + second.stdout + second.stderr


def test_probe_embed_with_a_wrong_token_says_one_line_and_stops(exam_tables, orthanc, tmp_path):
    _, table, backbone, _ = exam_tables
    gate = Proxy(orthanc, token=TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMWEB_")}
    env.update(DICOMWEB_TOKEN="wrong-" + TOKEN, DBT_DINO_CACHE=str(tmp_path))
    try:
        run, _ = _probe(["embed", "--data", gate.url, "--manifest", str(table), "--workers", "1",
                         "--backbone", str(backbone)], env)
    finally:
        gate.stop()
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and lines[-1].startswith("error: "), run.stderr[-3000:]
    assert "HTTP 401" in lines[-1], run.stderr[-3000:]
    # one line, no traceback
    assert [line for line in lines if "401" in line or "Error" in line] == lines[-1:]
    assert TOKEN not in run.stdout + run.stderr
    assert len(gate.log) == 1  # stopped at the first refusal, before any loader worker asked again
    assert not list(tmp_path.rglob("*.pt"))  # no embedding written


def test_remote_volume_reader_reads_what_the_local_one_reads_and_pins_only_while_reading(
        studies, proxy, tmp_path):
    rows, files, _, _ = studies
    # in the table, not on the server: 404
    ghost = dict(rows[0], SOPInstanceUID="1.2.826.0.1.3680043.10.99.7")
    client = _client(proxy, rows + [ghost], tmp_path)
    chosen = [rows[0], rows[4]]  # JPEG 2000 and native
    reader = data.RemoteVolumeReader(client, chosen + [ghost])
    local = data.VolumeReader([files[r["SOPInstanceUID"]] for r in chosen])
    for i in range(2):
        (_, got), (_, want) = reader[i], local[i]
        assert torch.equal(got["stored"], want["stored"]) and torch.equal(got["rows"], want["rows"])
        assert (got["invert"], got["flip"]) == (want["invert"], want["flip"])
    i, message = reader[2]
    assert i == 2 and isinstance(message, str)
    assert ghost["SOPInstanceUID"] in message and "404" in message
    assert not client.cache.usage()[2]  # nothing left pinned once read
    wrong = pacs.load_credentials(environ={"DICOMWEB_USER": USER,
                                           "DICOMWEB_PASSWORD": "wrong-" + PASSWORD})
    refused = _client(proxy, rows, tmp_path / "refused", credentials=wrong)
    assert isinstance(data.RemoteVolumeReader(refused, rows[:1])[0][1], pacs.AuthError)
    # embed_volumes stops on it, it does not skip it
    with pytest.raises(pacs.AuthError, match="HTTP 401"):
        probe.embed_volumes(model.build("tiny"), rows[:2], "cpu", size=28, workers=0,
                            client=refused)
    # the cache must hold one volume per loader worker at once
    size = files[rows[4]["SOPInstanceUID"]].stat().st_size
    small = _client(proxy, rows + [ghost], tmp_path / "small", cap=int(1.5 * size))
    # the first that can be fetched tells the size
    pacs.check_fetchable(small, [ghost, rows[4]], workers=1)
    need = math.ceil(2 * size / 2**20)
    with pytest.raises(ValueError,
                       match=f"cannot hold the 2 volumes read at once.*at least {need}M"):
        pacs.check_fetchable(small, [rows[4]], workers=2)
    assert not small.cache.usage()[2]
    # nothing fetchable and nothing reused: stop at once rather than retry every instance of the
    # table in turn
    gone = pacs.Client(f"dicomweb+http://127.0.0.1:{_free_port()}/dicom-web", rows, small.cache,
                       retries=2, backoff=0.01, timeout=2)
    with pytest.raises(ValueError,
                       match="none of the first 2 instances could be fetched.*Connection"):
        pacs.check_fetchable(gone, rows[:2], workers=1)
    pacs.check_fetchable(gone, rows[:2], workers=1, reused=3)  # cached exams: still probed
