"""A DICOMweb client and a bounded rotating disk cache: DICOM instances from a PACS to local files.

Standard library only, and nothing of this repo: data.py reads the files left in the cache with the
same reader as a local archive, so remote and local pixels go through one code path.
- Source: dicomweb+http(s)://host[:port]/prefix, e.g. dicomweb+https://pacs.example.org/dicom-web.
- Manifest: a CSV with StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID (other columns, e.g. exam
  and view, are kept for the caller). It is also the allow-list: every URL is built from a manifest
  row, anything else is refused before a socket is touched, and redirects are never followed, so no
  URL outside it is requested.
- Retrieval (WADO-RS): GET {prefix}/studies/{st}/series/{se}/instances/{sop} with
  Accept: multipart/related; type="application/dicom"; transfer-syntax=*  (as stored, no
  transcoding); the one-part multipart body is streamed to disk, never held in memory (a native DBT
  volume is ~600 MB).
- Credentials: DICOMWEB_TOKEN (bearer) or DICOMWEB_USER + DICOMWEB_PASSWORD (basic), from the
  environment or from the same KEY=VALUE lines in a file (mode 600, outside the repository). They
  exist only in the Authorization header: no message, repr or log line contains them. URLs are
  logged without user info.
- Faults: 429, 5xx, timeouts and dropped or truncated connections are retried with exponential
  backoff and full jitter, waiting at least Retry-After; after `retries` tries the instance raises
  FetchError (the caller skips it). 401/403 and failed https verification raise AuthError at once:
  a wrong password must not turn into a million retries (or a locked account).
- Cache: <root>/dicomweb/ab/<sha256>.dcm, written under a temporary name and os.replace'd, so a
  reader never sees a partial file. Space is reserved before the bytes arrive (the temporary file is
  allocated to its size under an fcntl lock on <root>/dicomweb/.lock, which is also the one place
  eviction happens), so finished plus unfinished files never exceed the byte cap, and writes stop
  above a free-disk floor. Eviction is LRU by access time (set on every hit); pinned files (volumes
  resident in some process) are never evicted. Pins and temporary files name their pid, so those of
  a crashed process are cleaned up: the cache survives restarts. The folder must be node-local
  (flock and pids mean nothing across NFS clients).
"""
import base64
import contextlib
import csv
import email.utils
import fcntl
import hashlib
import math
import http.client
import os
import random
import re
import shutil
import socket
import ssl
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1: digits and dots; keeps "../" out of URLs
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SECRET_KEYS = ("DICOMWEB_TOKEN", "DICOMWEB_USER", "DICOMWEB_PASSWORD")
# An instance's bytes never change (its UID names them), so each cached copy gets the same mtime and
# data.py's index cache, keyed on (path, size, mtime), outlives eviction. LRU uses atime.
FIXED_MTIME = 946684800  # 2000-01-01
CHUNK = 1 << 20
# what a flaky network raises; anything else (disk full, a bug) is not retried
NETWORK_ERRORS = (TimeoutError, ConnectionError, http.client.HTTPException, socket.gaierror,
                  ssl.SSLError)


class FetchError(OSError):
    """This instance could not be fetched (after retries where they help): skip it and count it."""


class AuthError(PermissionError):
    """The server refused our credentials (401/403) or https verification failed: stop the run."""

    def __str__(self):
        # DataLoader re-raises a worker's error as type(e)(message + traceback): keep our one line
        text = super().__str__().strip().splitlines()[-1]
        return text.split("AuthError: ", 1)[-1]


class _Transient(Exception):
    """A failure worth retrying, with the server's Retry-After (seconds) when it gave one."""

    def __init__(self, reason, retry_after=None):
        super().__init__(reason)
        self.retry_after = retry_after


# ----------------------------------------------------------------- source, manifest, credentials
def is_dicomweb(source):
    """True for a dicomweb+http:// or dicomweb+https:// source."""
    return str(source).startswith(("dicomweb+http://", "dicomweb+https://"))


def redact(url):
    """The URL as it may be logged: no user info, no query (tokens hide in both). Everything up to
    the last `@` goes, since a password typed unencoded may itself hold `@`, `/`, `?` or `#`;
    over-redacting is harmless."""
    head, sep, rest = str(url).partition("//")
    rest = rest.rsplit("@", 1)[-1]
    return (head + sep + rest).split("?")[0].split("#")[0]


def parse_url(source):
    """'dicomweb+https://host:port/prefix' -> (scheme, host, port, prefix without trailing /)."""
    if not is_dicomweb(source):
        raise ValueError(f"{redact(source)}: not a dicomweb+http:// or dicomweb+https:// URL")
    parts = urlsplit(str(source)[len("dicomweb+"):])
    # it would reach args.json and every log line: refuse, not strip. Anywhere in the URL, not just
    # urlsplit's netloc: a password typed with '/' or '?' in it ends the netloc before its '@'.
    if "@" in str(source):
        raise ValueError(f"{redact(source)}: no credentials in the URL; set DICOMWEB_TOKEN or "
                         "DICOMWEB_USER/DICOMWEB_PASSWORD, or name a credentials file")
    if parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"{redact(source)}: expected dicomweb+http(s)://host[:port]/prefix "
                         "(no query)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{redact(source)}: bad port") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def read_manifest(path):
    """Rows (dicts) of a manifest CSV; each names one instance by its three UIDs, syntax-checked."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in UID_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: manifest needs columns {', '.join(UID_COLUMNS)} and at least "
                         f"one row (missing: {', '.join(missing) or 'rows'})")
    for i, row in enumerate(rows, start=2):
        for c in UID_COLUMNS:
            row[c] = (row[c] or "").strip()
            if len(row[c]) > 64 or not UID.fullmatch(row[c]):
                raise ValueError(f"{path} line {i}: {c} {row[c][:80]!r} is not a DICOM UID")
    return rows


class Credentials:
    """An Authorization header value that no repr, str or log line shows."""
    __slots__ = ("header", "kind")

    def __init__(self, header, kind):
        self.header, self.kind = header, kind

    def __repr__(self):
        return f"<{self.kind} credentials, hidden>"

    __str__ = __repr__


def load_credentials(file=None, environ=None):
    """Credentials from `file` (KEY=VALUE lines), else the environment; None for an open server."""
    if file:
        values = _read_secret_file(file)
    else:
        values = {k: v for k, v in (environ or os.environ).items() if k in SECRET_KEYS}
    where = file or "the environment"
    token, user, password = (values.get(k) for k in SECRET_KEYS)
    for key in SECRET_KEYS:  # a line break would let the value forge a second header
        if any(ch in (values.get(key) or "") for ch in "\r\n\0"):
            raise ValueError(f"{key} in {where} contains a line break or NUL")
    if token:
        return Credentials(f"Bearer {token}", "bearer")
    if bool(user) != bool(password):
        raise ValueError(f"{where}: DICOMWEB_USER and DICOMWEB_PASSWORD must be set together")
    if user:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return Credentials("Basic " + basic, "basic")
    return None


def _read_secret_file(file):
    path = Path(file).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{file}: credentials file not found")
    if path.is_relative_to(Path(__file__).resolve().parent):  # one `git add` from being published
        raise ValueError(f"{file}: keep the credentials file outside the repository")
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(f"{file}: readable by group or others (mode {mode & 0o777:o}); "
                         "chmod 600 it")
    values = {}
    expected = ", ".join(k + "=..." for k in SECRET_KEYS)
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            if not sep or key.strip() not in SECRET_KEYS:  # name the line, never echo its secret
                raise ValueError(f"{file} line {n}: expected one of {expected}")
            values[key.strip()] = value.strip()
    return values


def retry_after(value, now=None):
    """Seconds from a Retry-After header (delta-seconds or HTTP date, RFC 9110 10.2.3), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def multipart_boundary(content_type):
    """The boundary parameter of a multipart Content-Type, unquoted; None when not multipart."""
    if not (content_type or "").lower().startswith("multipart/"):
        return None
    match = re.search(r'boundary\s*=\s*("([^"]+)"|[^;\s]+)', content_type, re.I)
    return (match.group(2) or match.group(1)).encode() if match else None


def copy_single_part(read, write, boundary, max_head=1 << 16):
    """Stream the one part of a multipart body from read(n) (b"" at the end) to write(bytes); return
    its headers. The payload ends right before CRLF--boundary (RFC 2046 5.1.1) and is never
    stripped: DICOM may end in whitespace bytes. Memory stays at one chunk whatever the size."""
    delim, buf = b"--" + boundary, bytearray()
    while (start := buf.find(delim)) < 0 or (end := buf.find(b"\r\n\r\n", start)) < 0:
        if len(buf) > max_head:
            raise ValueError(f"no multipart part header in the first {max_head} bytes")
        buf += _more(read)
    lines = bytes(buf[start + len(delim):end]).decode("latin-1").split("\r\n")[1:]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    del buf[:end + 4]
    tail = b"\r\n" + delim
    keep = len(tail) - 1  # a delimiter may straddle two reads
    while (i := buf.find(tail)) < 0:
        if len(buf) > keep:
            write(bytes(buf[:-keep]))
            del buf[:-keep]
        buf += _more(read)
    write(bytes(buf[:i]))
    rest = bytes(buf[i + len(tail):])
    while len(rest) < 2 and (chunk := read(2)):
        rest += chunk
    if rest[:2] != b"--" and len(rest) >= 2:
        raise ValueError("more than one part in the response for one instance")
    return headers


def _more(read):
    chunk = read(CHUNK)
    if not chunk:
        raise _Transient("connection closed before the end of the multipart body")
    return chunk


# ------------------------------------------------------------------------------------- the cache
def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class AlreadyCached(Exception):
    """Another process finished this instance while we were fetching it: use theirs."""


class CacheFull(OSError):
    """No room under the byte cap or above the free-disk floor, even after evicting all unpinned."""


class TooLarge(FetchError):
    """One instance larger than the whole cap: it can never be cached, so it is skipped and counted
    like a failed fetch instead of stopping the run (the other instances fit)."""


class Cache:
    """The node's bounded store of whole instances, shared by every process naming its folder."""

    def __init__(self, root, cap_bytes, floor_bytes=1 << 30, wait_s=120.0):
        self.dir = Path(root) / "dicomweb"
        self.cap, self.floor = int(cap_bytes), int(floor_bytes)
        self.wait_s = wait_s
        (self.dir / "pins").mkdir(parents=True, exist_ok=True)

    def path(self, key):
        """The cache file of `key`: <root>/dicomweb/ab/<sha256>.dcm."""
        h = hashlib.sha256(key.encode()).hexdigest()
        return self.dir / h[:2] / f"{h}.dcm"

    @contextlib.contextmanager
    def locked(self):
        """The node-wide lock: eviction, reservations and pin-then-check never interleave."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def pin(self, path):
        """Pin `path` whether or not it is cached yet, then look (under the lock, so eviction cannot
        slip in between): (token for unpin, True if the file is there)."""
        with self.locked():
            token = self.dir / "pins" / f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            token.touch()
            hit = path.exists()
            if hit:  # LRU by atime, set here because noatime mounts never move it themselves
                os.utime(path, (time.time(), FIXED_MTIME))
            return token, hit

    def unpin(self, token):
        """Release a pin that pin() returned (None: nothing to release)."""
        if token is not None:
            token.unlink(missing_ok=True)

    def usage(self):
        """(bytes of finished + unfinished files, [(atime, size, path)] evictable, pinned stems)."""
        pinned = set()
        for e in os.scandir(self.dir / "pins"):
            stem, pid = e.name.split(".")[:2]
            if _alive(int(pid)):
                pinned.add(stem)
            else:  # a crashed process's pin
                Path(e.path).unlink(missing_ok=True)
        used, files = 0, []
        for sub in os.scandir(self.dir):
            if not sub.is_dir() or sub.name == "pins":
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat()
                except FileNotFoundError:  # a writer gave up on its temporary file meanwhile
                    continue
                if ".tmp." in e.name and not _alive(int(e.name.split(".")[3])):
                    Path(e.path).unlink(missing_ok=True)  # a crashed writer's reservation
                    continue
                used += st.st_size
                if ".tmp." not in e.name and e.name.split(".")[0] not in pinned:
                    files.append((st.st_atime, st.st_size, e.path))
        return used, files, pinned

    def _make_room(self, need):
        """Evict least recently used unpinned files until `need` more bytes fit (lock held): True if
        they do."""
        used, files, _ = self.usage()
        free = shutil.disk_usage(self.dir).free
        for _, size, path in sorted(files):
            if used + need <= self.cap and free - need >= self.floor:
                break
            Path(path).unlink(missing_ok=True)
            used, free = used - size, free + size
        return used + need <= self.cap and free - need >= self.floor

    def reserve(self, fh, nbytes, final):
        """Grow the temporary file `fh` to nbytes, counted against the cap before a byte of it is
        written. Raises AlreadyCached when another process finished `final` meanwhile: two copies
        of one instance would count twice, and with every process holding one such duplicate the
        cache could wait on itself until timeout."""
        if nbytes > self.cap:
            raise TooLarge(f"cache {self.dir}: one instance needs {nbytes} bytes, more than "
                           f"--cache-bytes {self.cap}")
        deadline = time.monotonic() + self.wait_s
        while True:
            with self.locked():
                if final.exists():
                    raise AlreadyCached(final)
                if self._make_room(nbytes - os.fstat(fh.fileno()).st_size):
                    _allocate(fh.fileno(), nbytes)
                    return
            if time.monotonic() > deadline:  # the rest is pinned by resident volumes, or disk full
                used, _, pinned = self.usage()
                raise CacheFull(f"cache {self.dir}: no room for {nbytes} bytes in "
                                f"{self.wait_s:.0f} s (cap {self.cap}, {used} used, {len(pinned)} "
                                f"pinned volumes, free-disk floor {self.floor}): raise "
                                "--cache-bytes or lower the number of resident/prefetched volumes")
            time.sleep(0.2)  # other processes retire their volumes meanwhile

    def write(self, path, copy, expected=None, check=None):
        """Atomically create `path` from copy(write) (write(bytes) reserves as it goes), after
        check(tmp path) passes; returns bytes written, or None when another process wrote `path`
        first (then copy is cut short). `expected`: a size hint for the first reservation."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                reserved, written = 0, 0

                def write(b):
                    nonlocal reserved, written
                    if written + len(b) > reserved:  # doubling: log(n) lock round trips per body
                        reserved = max(written + len(b), expected or 0, min(2 * reserved, self.cap))
                        self.reserve(fh, reserved, path)
                    fh.write(b)
                    written += len(b)

                try:
                    copy(write)
                except AlreadyCached:
                    return None
                fh.truncate(written)
            if check:
                check(tmp)
            os.utime(tmp, (time.time(), FIXED_MTIME))
            with self.locked():  # a rename during an evictor's listing could hide it from its sum
                os.replace(tmp, path)  # readers see the old state or the whole file, never a part
            return written
        finally:
            tmp.unlink(missing_ok=True)


def _allocate(fd, nbytes):
    """Take the disk blocks now, so the free-disk check counts them (sparse where the fs cannot)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.ftruncate(fd, nbytes)


# ------------------------------------------------------------------------------------ the client
class Client:
    """WADO-RS retrieval of the manifest's instances into a Cache, with retries and a bound on
    requests in flight. Sockets, TLS context, the in-flight semaphore and the fetch threads are made
    lazily in the process that uses them (after a DataLoader forks), never inherited. stats: hits,
    misses, bytes fetched, retries (this process)."""

    def __init__(self, url, rows, cache, credentials=None, ca_bundle=None, timeout=60.0, retries=6,
                 backoff=1.0, max_wait=60.0, max_in_flight=2, log=None):
        self.scheme, self.host, self.port, self.prefix = parse_url(url)
        if ca_bundle and not Path(ca_bundle).is_file():
            raise FileNotFoundError(f"{ca_bundle}: CA bundle not found")
        self.url, self.cache = redact(url), cache
        self.credentials, self.ca_bundle = credentials, ca_bundle
        self.timeout, self.retries = timeout, retries
        self.backoff, self.max_wait = backoff, max_wait
        self.max_in_flight = max_in_flight
        self.allowed = {tuple(r[c] for c in UID_COLUMNS) for r in rows}  # the allow-list
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stats = dict(hits=0, misses=0, bytes=0, retries=0)
        self._pid = None

    def __getstate__(self):  # spawn-started workers get a copy without our sockets and locks
        local = ("_tls", "_slots", "_pool", "_tls_context", "_stats_lock")
        return {k: v for k, v in self.__dict__.items() if k not in local} | {"_pid": None}

    def _here(self):
        """Per-process state, made on first use in each process: a forked child shares no socket."""
        if self._pid != os.getpid():
            self._pid, self._tls = os.getpid(), threading.local()
            self._pool = None
            self._stats_lock = threading.Lock()
            self._slots = threading.BoundedSemaphore(self.max_in_flight)
            https = self.scheme == "https"
            self._tls_context = ssl.create_default_context(cafile=self.ca_bundle) if https else None
        return self._tls

    def key(self, row):
        """The cache key of a manifest row; refuses a row that is not in the manifest."""
        uids = tuple(row[c] for c in UID_COLUMNS)
        if uids not in self.allowed:
            raise ValueError(f"{'/'.join(uids)}: not in the manifest, never requested")
        return f"{self.url}|" + "|".join(uids)

    def fetch(self, row):
        """(local path, pin token) of the instance `row` names, downloaded on a miss, pinned (never
        evicted) until cache.unpin(token). Raises FetchError (skip it) or AuthError (stop)."""
        path = self.cache.path(self.key(row))
        self._here()
        token, hit = self.cache.pin(path)
        try:
            size = 0 if hit else self._download(row, path)
            with self._stats_lock:  # several fetch threads per process
                self.stats["bytes"] += size
                self.stats["hits" if hit else "misses"] += 1
            return path, token
        except BaseException:
            self.cache.unpin(token)
            raise

    def prefetch(self, rows, ahead=2):
        """Fetch `rows` in order, up to `ahead` beyond the one in use: yields (row, path, token), or
        (row, None, FetchError) for an instance that failed. AuthError and CacheFull stop it."""
        self._here()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="dicomweb")
        pending, rows = [], iter(rows)
        try:
            while True:
                while len(pending) <= ahead and (row := next(rows, None)) is not None:
                    pending.append((row, self._pool.submit(self.fetch, row)))
                if not pending:
                    return
                row, future = pending.pop(0)
                try:
                    yield (row, *future.result())
                except FetchError as e:
                    yield row, None, e
        finally:  # the consumer stopped early: drop what is queued, unpin what already arrived
            for _, future in pending:
                if not future.cancel():  # running: unpin when it lands (at once if it has)
                    future.add_done_callback(
                        lambda f: f.exception() or self.cache.unpin(f.result()[1]))

    def _download(self, row, path):
        """GET the instance into the cache with retries; bytes written."""
        uids = tuple(row[c] for c in UID_COLUMNS)
        target = f"{self.prefix}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
        name = f"study {uids[0]} series {uids[1]} instance {uids[2]}"
        reason = "no attempt"
        for attempt in range(self.retries):
            try:
                with self._slot():
                    return self._get(target, path)
            except _Transient as e:
                reason = str(e)
                if (e.retry_after or 0) > self.max_wait:  # never sooner than asked: skip it instead
                    raise FetchError(f"{name}: {reason}; the server asked for a retry after "
                                     f"{e.retry_after:.0f} s, more than the "
                                     f"{self.max_wait:.0f} s this client waits") from None
                cap = min(self.max_wait, self.backoff * 2 ** attempt)
                delay = self._rng().uniform(0, cap)  # full jitter
                delay = max(delay, e.retry_after or 0)
                if attempt + 1 < self.retries:
                    with self._stats_lock:
                        self.stats["retries"] += 1
                    time.sleep(delay)
        raise FetchError(f"{name}: {reason} ({self.retries} tries)")

    def _rng(self):  # a private generator: jitter must not move the training's `random` stream
        tls = self._here()
        if not hasattr(tls, "rng"):
            tls.rng = random.Random()
        return tls.rng

    @contextlib.contextmanager
    def _slot(self):
        self._here()
        with self._slots:  # bounded requests in flight per process, whatever the number of threads
            yield

    def _connection(self):
        tls = self._here()
        if getattr(tls, "conn", None) is None:
            if self.scheme == "https":  # verified against the system store or --dicomweb-ca-bundle
                tls.conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                       context=self._tls_context)
            else:
                tls.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return tls.conn

    def _drop(self):
        conn, self._here().conn = getattr(self._here(), "conn", None), None
        if conn is not None:
            conn.close()

    def _get(self, target, path):
        """One GET of one instance into the cache; raises _Transient for what is worth a retry."""
        headers = {"Accept": ACCEPT, "User-Agent": "dbt-dino"}
        if self.credentials:
            headers["Authorization"] = self.credentials.header
        try:
            conn = self._connection()
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
        except ssl.SSLCertVerificationError as e:  # not a network hiccup: a wrong or missing CA
            raise AuthError(f"{self.url}: https certificate not trusted ({e.verify_message}); "
                            "add its CA with --dicomweb-ca-bundle") from None
        except NETWORK_ERRORS as e:
            self._drop()
            raise _Transient(f"{type(e).__name__}: {e}") from None
        if resp.status in (401, 403):
            self._drop()
            raise AuthError(f"{self.url}: HTTP {resp.status} {resp.reason}: the server refused the "
                            "credentials (DICOMWEB_TOKEN, or DICOMWEB_USER/DICOMWEB_PASSWORD, or "
                            "the credentials file); stopping")
        if resp.status != 200:
            wait = retry_after(resp.getheader("Retry-After"))
            self._drop()  # not worth reading the error body: a new connection is cheaper
            reason = f"HTTP {resp.status} {resp.reason}"
            if resp.status == 429 or resp.status >= 500:
                raise _Transient(reason, wait)
            if 300 <= resp.status < 400:
                reason += " (redirects are not followed: the manifest is the allow-list)"
            raise FetchError(f"{target}: {reason}")
        boundary = multipart_boundary(resp.getheader("Content-Type"))
        if boundary is None:
            self._drop()
            raise FetchError(f"{target}: expected multipart/related, "
                             f"got {resp.getheader('Content-Type')!r}")
        return self._receive(resp, boundary, path, target)

    def _receive(self, resp, boundary, path, target):
        def read(n):
            try:
                return resp.read(n)
            except NETWORK_ERRORS as e:
                raise _Transient(f"{type(e).__name__}: {e}") from None

        def copy(write):
            headers.update(copy_single_part(read, write, boundary))

        def check(tmp):
            part_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if part_type not in ("application/dicom", "") or not _is_dicom(tmp):
                raise ValueError(f"the part is {part_type or 'untyped'}, not a DICOM file")

        headers, length = {}, resp.getheader("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        try:
            size = self.cache.write(path, copy, expected, check)
            if size is None:  # another process got there first: the rest is not worth reading
                self._drop()
                return 0
        except _Transient:
            self._drop()
            raise
        except ValueError as e:  # a malformed body: the server will not answer better next time
            self._drop()
            raise FetchError(f"{target}: {e}") from None
        read(1 << 16)  # the epilogue, so the connection can serve the next request
        if not resp.isclosed():
            self._drop()
        return size


def check_fetchable(client, candidates, workers, reused=0):
    """Fetch the first fetchable of `candidates` before the loader forks: a refused login stops here
    after one request, and its size tells whether the cache holds one pinned volume per worker. If
    none can be fetched and no exam was reused, the server is taken for unreachable."""
    reasons = []
    for uids in candidates:
        try:
            path, pin = client.fetch(uids)
            break
        except FetchError as e:
            reasons.append(str(e))
    else:
        if reasons and not reused:
            raise ValueError(f"{client.url}: none of the first {len(reasons)} instances could be "
                             "fetched: " + "; ".join(reasons))
        return
    try:
        size = path.stat().st_size
    finally:
        client.cache.unpin(pin)
    n = max(workers, 1)
    if n * size > client.cache.cap:
        raise ValueError(f"--cache-bytes {client.cache.cap} cannot hold the {n} volumes read at "
                         f"once (one per loader worker, about {size / 2**20:.0f} MiB each): use at "
                         f"least {math.ceil(n * size / 2**20)}M")


def _is_dicom(path):
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"  # PS3.10 7.1: 128-byte preamble, then the prefix
