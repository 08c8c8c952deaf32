"""Turning an OpenAI `image_url` into a checked RGB PIL image plus a content digest.

Sources: `data:` URLs (base64, strictly decoded), `file://` paths inside ALLOWED_LOCAL_MEDIA_PATH, and http(s) URLs
when ALLOW_REMOTE_IMAGES is on. Every source is capped in bytes before it is decoded and in pixels before the
pixels are decompressed (decompression bombs), and the bytes must really be a PNG, JPEG or WebP whatever the URL
claims. Reading and decoding run in a worker thread: a large screenshot must not stall the event loop. Every refusal is an
`InvalidInput` (HTTP 400) naming the offending part.

The digest hashes the decoded pixels and size, so the same screenshot re-encoded (PNG vs. WebP, other metadata)
gets the same digest: it keys prefix reuse and the response cache.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image

from function.config import Config
from function.engine.protocol import InvalidInput

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image      # RGB, fully loaded
    digest: str             # sha256 hex of size + RGB pixels


class ImageLoader:
    def __init__(self, config: Config):
        self.max_bytes = config.max_image_bytes
        self.max_pixels = config.max_image_source_pixels
        self.local_root = Path(config.allowed_local_media_path).resolve() if config.allowed_local_media_path else None
        self.allow_remote = config.allow_remote_images
        self.remote_timeout = config.remote_image_timeout_s

    async def load(self, url: str, param: str) -> LoadedImage:
        """The image behind `url`; `param` names the request part in errors (e.g. messages[0].content[1])."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("data", "file"):
            read = self._from_data_url if scheme == "data" else self._from_file
            return await asyncio.to_thread(lambda: self._decode(read(url, param), param))
        if scheme in ("http", "https"):
            data = await self._from_remote(url, param)
            return await asyncio.to_thread(self._decode, data, param)
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

    def _from_file(self, url: str, param: str) -> bytes:
        if self.local_root is None:
            raise InvalidInput("file:// image URLs are disabled (set ALLOWED_LOCAL_MEDIA_PATH)", param=param)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput("file:// image URLs must name a local path", param=param)
        path = Path(unquote(parts.path)).resolve()      # symlinks followed before the containment check
        if not path.is_relative_to(self.local_root):    # checked before existence: no probing outside the root
            raise InvalidInput("image file is outside ALLOWED_LOCAL_MEDIA_PATH", param=param)
        if not path.is_file():
            raise InvalidInput("image file not found", param=param)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise self._too_big(size, param)
        return path.read_bytes()

    async def _from_remote(self, url: str, param: str) -> bytes:
        if not self.allow_remote:
            raise InvalidInput("http(s) image URLs are disabled (set ALLOW_REMOTE_IMAGES)", param=param)
        buf = bytearray()
        try:
            async with httpx.AsyncClient(timeout=self.remote_timeout, follow_redirects=True) as client:
                async with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise InvalidInput(f"fetching the image failed: HTTP {resp.status_code}", param=param)
                    declared = int(resp.headers.get("content-length") or 0)
                    if declared > self.max_bytes:
                        raise self._too_big(declared, param)
                    async for piece in resp.aiter_bytes():
                        buf += piece
                        if len(buf) > self.max_bytes:
                            raise self._too_big(len(buf), param)
        except httpx.HTTPError as e:
            raise InvalidInput(f"fetching the image failed: {type(e).__name__}", param=param) from None
        return bytes(buf)

    def _decode(self, data: bytes, param: str) -> LoadedImage:
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:
            raise self._too_many_pixels(None, param) from None
        except Exception:   # PIL raises many types for data that is not an image; all mean the same to the client
            raise InvalidInput("image data is not a PNG, JPEG or WebP image", param=param) from None
        with img:
            w, h = img.size
            if w * h > self.max_pixels:                     # header only so far: nothing decompressed yet
                raise self._too_many_pixels((w, h), param)
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
