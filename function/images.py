"""Turning OpenAI `image_url`s into checked RGB PIL images plus content digests, with bounded work per request.

Sources: `data:` URLs (base64, strictly decoded), `file://` paths inside ALLOWED_LOCAL_MEDIA_PATH, and http(s) URLs
when ALLOW_REMOTE_IMAGES is on. Every source is capped in bytes before it is decoded, and the bytes must really be a
PNG, JPEG or WebP whatever the URL claims. `load_many` takes a request's images together: the count first (no byte
is fetched for a request over MAX_IMAGES_PER_REQUEST), then every image's bytes (a data: URL is only base64-decoded),
then every header (PIL's `Image.open` without `load()`: dimensions against MAX_IMAGE_SOURCE_PIXELS each and
MAX_REQUEST_IMAGE_PIXELS summed), then the admission decision (the serving layer's 429 when the server is full, see
`set_admission`), and only then the full decodes, so that no pixel is decompressed for a request that is refused.
Reading and decoding run in worker threads. Every refusal is an `InvalidInput` (HTTP 400) naming the offending part,
or the admission's `Overloaded` (429).

Admission: the serving layer (api/serving.py) registers, for the Config object it serves, a context manager that
refuses with `Overloaded` when the server is at capacity and counts the request as queued while its images are
decoded. Every `ImageLoader` built from that Config object (the chat route's, and the response cache's, which loads
images for the key before the route, function/front.py) enters it around its decodes, so a full server answers 429
without decoding anything; a loader of a Config nobody registered (the cache-front role) decodes without it.

`file://` paths are opened by walking from the root directory's descriptor one component at a time with
`O_NOFOLLOW` (openat): no symbolic link is followed and `..` is refused, so swapping a directory for a symlink
while requests run cannot lead outside the root; the size is checked on the open descriptor. NUL and other
invalid paths are a 400.

Remote URLs (docs/security.md): the host is resolved once and every address it resolves to must be public - not
loopback, private (RFC 1918, fc00::/7), shared, link-local (169.254.0.0/16, fe80::/10), multicast, reserved or
unspecified, IPv4-mapped and 6to4/Teredo forms included (whatever the spelling: `127.1`, `2130706433`, `0x7f.1`,
`[::ffff:127.0.0.1]` all resolve to the address that is checked) - unless REMOTE_IMAGE_ALLOWED_HOSTS names the host.
The connection goes to the checked address (the Host header and TLS server name stay the URL's), without proxies
from the environment; at most REMOTE_IMAGE_MAX_REDIRECTS redirects, each checked again; the whole fetch is bounded
by REMOTE_IMAGE_TIMEOUT_S. Every failure gives the client one and the same message (no port-scan oracle); the log
says why, without the URL's path or query.

The digest hashes the decoded pixels and size, so the same screenshot re-encoded (PNG vs. WebP, other metadata)
gets the same digest: it keys prefix reuse and the response cache. Images already loaded for this request (the
response cache keys a request with them before the model sees it, function/front.py) are handed over through
`prefetched()`, so a remote image is fetched once per request and the key comes from the very bytes the model sees.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import errno
import hashlib
import io
import ipaddress
import logging
import os
import socket
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, ContextManager, Iterator, Sequence
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from function.config import Config
from function.errors import InvalidInput

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "WEBP")
REMOTE_FAILED = "the image URL could not be fetched as an image"
"""The one message of every remote fetch failure."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_PREFETCHED: contextvars.ContextVar[dict[str, LoadedImage] | None] = contextvars.ContextVar("prefetched",
                                                                                              default=None)


Admit = Callable[[], ContextManager[None]]
"""Entered around a request's decodes: raises `Overloaded` (429) when the server is full, else counts the request
as queued until the decodes are done."""
_ADMISSIONS: dict[int, Admit] = {}


def set_admission(config: Config, admit: Admit) -> None:
    """Every ImageLoader of this very Config object (not an equal one) enters `admit` before it decodes."""
    key = id(config)
    if key not in _ADMISSIONS:
        weakref.finalize(config, _ADMISSIONS.pop, key, None)
    _ADMISSIONS[key] = admit


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image      # RGB, fully loaded
    digest: str             # sha256 hex of size + RGB pixels
    fetched: bytes | None = None    # the encoded bytes of a remote image, as fetched (else None)


@contextlib.contextmanager
def prefetched(images: dict[str, LoadedImage]) -> Iterator[None]:
    """Within this block (this task and what it awaits), `ImageLoader` returns these images for their URLs instead
    of loading them again."""
    token = _PREFETCHED.set({**(_PREFETCHED.get() or {}), **images})
    try:
        yield
    finally:
        _PREFETCHED.reset(token)


class _FetchFailed(Exception):
    """A remote fetch failed; the message is for the log only."""


def public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is an address on the public internet (and may be fetched without an allow-list entry)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not public_address(embedded):
            return False
    return ip.is_global and not ip.is_multicast


class ImageLoader:
    def __init__(self, config: Config):
        self._config_id = id(config)
        self._config_ref = weakref.ref(config)
        self.max_bytes = config.max_image_bytes
        self.max_pixels = config.max_image_source_pixels
        self.max_request_pixels = config.max_request_image_pixels
        self.max_images = config.max_images_per_request
        self.local_root = Path(config.allowed_local_media_path).resolve() if config.allowed_local_media_path else None
        self.allow_remote = config.allow_remote_images
        self.remote_timeout = config.remote_image_timeout_s
        self.max_redirects = config.remote_image_max_redirects
        self.allowed_hosts = frozenset(h.strip().lower().strip("[]") for h in
                                       config.remote_image_allowed_hosts.split(",") if h.strip())

    async def load(self, url: str, param: str) -> LoadedImage:
        """The image behind `url`; `param` names the request part in errors (e.g. messages[0].content[1])."""
        return (await self.load_many([(url, param)]))[0]

    async def load_many(self, items: Sequence[tuple[str, str]]) -> list[LoadedImage]:
        """The images of one request, (url, param) each, in order: count, bytes, headers, then decodes."""
        if len(items) > self.max_images:
            raise InvalidInput(f"{len(items)} images in one request; the limit is {self.max_images} "
                               "(MAX_IMAGES_PER_REQUEST)", param="messages")
        known = _PREFETCHED.get() or {}
        out: list[LoadedImage | None] = [known.get(url) for url, _ in items]
        todo = [i for i, img in enumerate(out) if img is None]
        if not todo:
            return out                                   # type: ignore[return-value]
        data = [await self._bytes(*items[i]) for i in todo]
        opened = await asyncio.to_thread(self._headers, data, [items[i][1] for i in todo])
        try:
            with self._admission():         # the 429 decision, before any pixel is decompressed
                for i, img, blob in zip(todo, opened, data):
                    loaded = await asyncio.to_thread(self._decode, img, items[i][1])
                    if items[i][0][:4].lower() == "http":
                        loaded = LoadedImage(loaded.image, loaded.digest, blob)
                    out[i] = loaded
        finally:
            for img in opened:
                img.close()
        return out                                       # type: ignore[return-value]

    def _admission(self) -> ContextManager[None]:
        admit = _ADMISSIONS.get(self._config_id) if self._config_ref() is not None else None
        return admit() if admit is not None else contextlib.nullcontext()

    async def _bytes(self, url: str, param: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return await asyncio.to_thread(self._from_data_url, url, param)
        if scheme == "file":
            return await asyncio.to_thread(self._from_file, url, param)
        if scheme in ("http", "https"):
            return await self._from_remote(url, param)
        raise InvalidInput("image_url must be a data: URL (base64 PNG, JPEG or WebP)"
                           + (", a file:// URL" if self.local_root else "")
                           + (" or an http(s) URL" if self.allow_remote else ""), param=param)

    def _too_big(self, size: int, param: str) -> InvalidInput:
        return InvalidInput(f"image is {size} bytes; the limit is {self.max_bytes} bytes (MAX_IMAGE_BYTES)",
                            param=param)

    def _from_data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise InvalidInput("data: image URLs must be base64: data:image/png;base64,...", param=param)
        if len(payload) * 3 // 4 > self.max_bytes:          # cheap bound, checked before decoding anything
            raise self._too_big(len(payload) * 3 // 4, param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("image data is not valid base64", param=param) from None

    # --- file://
    def _from_file(self, url: str, param: str) -> bytes:
        if self.local_root is None:
            raise InvalidInput("file:// image URLs are disabled (set ALLOWED_LOCAL_MEDIA_PATH)", param=param)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput("file:// image URLs must name a local path", param=param)
        try:
            raw = unquote(parts.path, errors="strict")
        except UnicodeDecodeError:
            raw = ""
        if not raw.startswith("/") or any(ord(c) < 32 for c in raw):       # NUL and control characters too
            raise InvalidInput("file:// image URL has an invalid path", param=param)
        names = [c for c in PurePosixPath(raw).parts[1:] if c != "."]
        root = self.local_root.parts[1:]
        # lexically inside the root, no `..`: checked before the file system is touched (no probing outside)
        if ".." in names or tuple(names[:len(root)]) != root:
            raise InvalidInput("image file is outside ALLOWED_LOCAL_MEDIA_PATH", param=param)
        inside = names[len(root):]
        if not inside:
            raise InvalidInput("image file not found", param=param)
        try:
            fd = os.open(self.local_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise InvalidInput("image file not found", param=param) from None
        try:
            for k, name in enumerate(inside):
                last = k == len(inside) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
                try:
                    step = os.open(name, flags, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.EMLINK) or (e.errno == errno.ENOTDIR and
                                                                  _is_link(fd, name)):
                        raise InvalidInput("image file path has a symbolic link, which is not followed (it could "
                                           "lead outside ALLOWED_LOCAL_MEDIA_PATH)", param=param) from None
                    raise InvalidInput("image file not found", param=param) from None
                os.close(fd)
                fd = step
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput("image file not found", param=param)
            if st.st_size > self.max_bytes:
                raise self._too_big(st.st_size, param)
            chunks, size = [], 0
            while piece := os.read(fd, min(1 << 20, self.max_bytes + 1 - size)):
                chunks.append(piece)
                size += len(piece)
                if size > self.max_bytes:                 # it grew after the fstat
                    raise self._too_big(size, param)
            return b"".join(chunks)
        finally:
            os.close(fd)

    # --- http(s)
    async def _from_remote(self, url: str, param: str) -> bytes:
        if not self.allow_remote:
            raise InvalidInput("http(s) image URLs are disabled (set ALLOW_REMOTE_IMAGES)", param=param)
        try:
            async with asyncio.timeout(self.remote_timeout):
                return await self._fetch(url)
        except (_FetchFailed, httpx.HTTPError, OSError, TimeoutError, ValueError, UnicodeError) as e:
            host = urlsplit(url).hostname if "://" in url else None
            reason = str(e) if isinstance(e, _FetchFailed) else type(e).__name__
            log.info("image fetch from host %r failed: %s", (host or "?")[:100], reason[:300])
            raise InvalidInput(REMOTE_FAILED, param=param) from None

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(timeout=self.remote_timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(self.max_redirects + 1):
                target = httpx.URL(url)
                if target.scheme not in ("http", "https") or not target.host:
                    raise _FetchFailed(f"not an http(s) URL with a host: {target.scheme}")
                if target.userinfo:
                    raise _FetchFailed("URL with user information")
                address = await self._checked_address(target.host, target.port or
                                                      (443 if target.scheme == "https" else 80))
                request = client.build_request(
                    "GET", target.copy_with(host=address),
                    headers={"Host": target.netloc.decode("ascii"), "Accept": "image/png,image/jpeg,image/webp"},
                    extensions={"sni_hostname": target.host} if target.scheme == "https" else None)
                response = await client.send(request, stream=True)
                try:
                    if response.status_code in _REDIRECTS and response.headers.get("location"):
                        url = urljoin(str(target), response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise _FetchFailed(f"HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise _FetchFailed(f"Content-Length {declared} over MAX_IMAGE_BYTES")
                    buf = bytearray()
                    async for piece in response.aiter_bytes():
                        buf += piece
                        if len(buf) > self.max_bytes:
                            raise _FetchFailed("body over MAX_IMAGE_BYTES")
                    return bytes(buf)
                finally:
                    await response.aclose()
        raise _FetchFailed(f"more than {self.max_redirects} redirects (REMOTE_IMAGE_MAX_REDIRECTS)")

    async def _checked_address(self, host: str, port: int) -> str:
        """The address to connect to: `host` resolved once, every address public unless the host is allowed."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise _FetchFailed("no address")
        if host.lower() not in self.allowed_hosts:
            refused = [a for a in addresses if not public_address(a)]
            if refused:
                raise _FetchFailed(f"resolves to a non-public address {refused[0]} (REMOTE_IMAGE_ALLOWED_HOSTS)")
        return str(addresses[0])

    # --- decoding
    def _headers(self, data: list[bytes], params: list[str]) -> list[Image.Image]:
        """Each image opened (its header read, nothing decompressed), the pixel caps checked on all of them."""
        opened: list[Image.Image] = []
        try:
            total = 0
            for blob, param in zip(data, params):
                try:
                    img = Image.open(io.BytesIO(blob), formats=FORMATS)
                except Image.DecompressionBombError:
                    raise self._too_many_pixels(None, param) from None
                except Exception:   # PIL raises many types for data that is not an image; all mean the same
                    raise InvalidInput("image data is not a PNG, JPEG or WebP image", param=param) from None
                opened.append(img)
                w, h = img.size
                if w * h > self.max_pixels:
                    raise self._too_many_pixels((w, h), param)
                total += w * h
                if total > self.max_request_pixels:
                    raise InvalidInput(f"the request's images have {total} pixels together; the limit is "
                                       f"{self.max_request_pixels} (MAX_REQUEST_IMAGE_PIXELS)", param=param)
            return opened
        except BaseException:
            for img in opened:
                img.close()
            raise

    def _decode(self, img: Image.Image, param: str) -> LoadedImage:
        w, h = img.size
        try:
            img.load()
        except Exception:
            raise InvalidInput("image data is truncated or corrupt", param=param) from None
        rgb = _to_rgb(img)
        digest = hashlib.sha256(f"{w}x{h}:".encode() + rgb.tobytes()).hexdigest()
        return LoadedImage(rgb, digest)

    def _too_many_pixels(self, size: tuple[int, int] | None, param: str) -> InvalidInput:
        dims = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
        return InvalidInput(f"image has {dims}; the limit is {self.max_pixels} pixels (MAX_IMAGE_SOURCE_PIXELS)",
                            param=param)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is flattened onto white (what a screenshot viewer shows), not onto arbitrary colours."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")
