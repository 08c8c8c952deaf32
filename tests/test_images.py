"""ImageLoader: every source, every cap and every refusal, against real encoded images (and a real local HTTP
server for remote URLs)."""
from __future__ import annotations

import io
import os
import time
import zlib
from pathlib import Path

import pytest
from conftest import data_url, image_bytes
from PIL import Image
from support.http_stub import StubHandler, serving

from function.errors import InvalidInput
from function.images import REMOTE_FAILED, ImageLoader

P = "messages[0].content[0].image_url"


def loader(make_config, **env) -> ImageLoader:
    return ImageLoader(make_config(**env))


async def refused(ldr: ImageLoader, url: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as e:
        await ldr.load(url, param=P)
    assert e.value.param == P
    assert e.value.kind == "invalid_request"
    assert fragment in e.value.message, e.value.message


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is cut short: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))


# --- data: URLs
@pytest.mark.parametrize("fmt,mime,save", [("PNG", "image/png", {}), ("JPEG", "image/jpeg", {"quality": 95}),
                                           ("WEBP", "image/webp", {"lossless": True})])
async def test_decodes_png_jpeg_webp_to_rgb(make_config, fmt, mime, save):
    img = await loader(make_config).load(data_url(image_bytes(fmt, size=(30, 20), **save), mime), P)
    assert img.image.mode == "RGB" and img.image.size == (30, 20)
    r, g, b = img.image.getpixel((5, 5))
    assert abs(r - 40) < 4 and abs(g - 120) < 4 and abs(b - 200) < 4
    assert len(img.digest) == 64


async def test_declared_type_is_ignored_bytes_are_sniffed(make_config):
    img = await loader(make_config).load(data_url(image_bytes("JPEG"), "image/png"), P)
    assert img.image.size == (32, 48)


async def test_transparency_is_flattened_on_white(make_config):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    img = (await loader(make_config).load(data_url(buf.getvalue()), P)).image
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 255)


async def test_digest_depends_on_pixels_not_encoding(make_config):
    ldr = loader(make_config)
    a = await ldr.load(data_url(image_bytes("PNG")), P)
    b = await ldr.load(data_url(image_bytes("WEBP", lossless=True), "image/webp"), P)
    c = await ldr.load(data_url(image_bytes("PNG", compress_level=0)), P)
    d = await ldr.load(data_url(image_bytes("PNG", color=(40, 120, 201))), P)
    e = await ldr.load(data_url(image_bytes("PNG", size=(48, 32))), P)
    assert a.digest == b.digest == c.digest
    assert len({a.digest, d.digest, e.digest}) == 3


@pytest.mark.parametrize("url,fragment", [
    ("data:image/png;base64,iVBORw0K$$$$", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),            # bad padding: strict decoding
    ("data:image/png;base64,iVBO Rw0K", "not valid base64"),               # whitespace is not base64
    ("data:image/png,iVBORw0KGgo=", "must be base64"),
    ("data:image/png;base64", "must be base64"),
    (data_url(b"GIF89a not really"), "not a PNG, JPEG or WebP"),
    (data_url(b""), "not a PNG, JPEG or WebP"),
    (data_url(image_bytes("GIF")), "not a PNG, JPEG or WebP"),
    (data_url(image_bytes("BMP")), "not a PNG, JPEG or WebP"),
    (data_url(image_bytes("PNG")[:60]), "truncated or corrupt"),
    ("gopher://x/y.png", "must be a data: URL"),
    ("just-a-string", "must be a data: URL"),
])
async def test_refusals(make_config, url, fragment):
    await refused(loader(make_config), url, fragment)


async def test_byte_cap_is_checked_before_decoding(make_config):
    ldr = loader(make_config, MAX_IMAGE_BYTES=1000)
    await refused(ldr, "data:image/png;base64," + "A" * 2000, "MAX_IMAGE_BYTES")   # not even valid image data
    ok = image_bytes(size=(4, 4))
    assert len(ok) < 1000
    assert (await ldr.load(data_url(ok), P)).image.size == (4, 4)


async def test_pixel_cap_is_checked_before_decompressing(make_config):
    ldr = loader(make_config, MAX_IMAGE_SOURCE_PIXELS=1_000_000)
    # the header says 9000x9000; decompressing would fail as truncated, so this message proves the order
    await refused(ldr, data_url(png_header_only(9000, 9000)), "9000x9000 pixels")
    await refused(ldr, data_url(image_bytes(size=(1001, 1000))), "MAX_IMAGE_SOURCE_PIXELS")
    assert (await ldr.load(data_url(image_bytes(size=(1000, 1000))), P)).image.size == (1000, 1000)


async def test_pil_decompression_bomb_guard_is_a_400_too(make_config):
    ldr = loader(make_config, MAX_IMAGE_SOURCE_PIXELS=10**12)     # our cap off: PIL's own guard trips first
    await refused(ldr, data_url(png_header_only(30000, 30000)), "MAX_IMAGE_SOURCE_PIXELS")


# --- file:// URLs
@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "shot.png").write_bytes(image_bytes())
    (tmp_path / "secret.png").write_bytes(image_bytes())
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(root / "sub" / "shot.png", root / "inside.png")
    return root


async def test_file_urls_inside_the_allowed_directory(make_config, media):
    ldr = loader(make_config, ALLOWED_LOCAL_MEDIA_PATH=media)
    assert (await ldr.load(f"file://{media}/sub/shot.png", P)).image.size == (32, 48)
    assert (await ldr.load(f"file://localhost{media}/sub/shot.png", P)).image.size == (32, 48)


@pytest.mark.parametrize("rel,fragment", [
    ("/../secret.png", "outside ALLOWED_LOCAL_MEDIA_PATH"),
    ("/sub/../../secret.png", "outside ALLOWED_LOCAL_MEDIA_PATH"),
    ("/escape.png", "symbolic link"),                                  # a symlink pointing out
    ("/inside.png", "symbolic link"),                                  # even one staying inside: never followed
    ("/sub%00/shot.png", "invalid path"),
    ("/sub/shot.png%00", "invalid path"),
    ("/sub/%ff.png", "invalid path"),
    ("/missing.png", "not found"),
    ("/sub", "not found"),
])
async def test_file_urls_cannot_escape(make_config, media, rel, fragment):
    await refused(loader(make_config, ALLOWED_LOCAL_MEDIA_PATH=media), f"file://{media}{rel}", fragment)


async def test_file_urls_outside_do_not_reveal_existence(make_config, media):
    ldr = loader(make_config, ALLOWED_LOCAL_MEDIA_PATH=media)
    await refused(ldr, "file:///etc/passwd", "outside")
    await refused(ldr, "file:///no/such/file.png", "outside")


async def test_file_urls_disabled_by_default_and_remote_hosts_refused(make_config, media):
    await refused(loader(make_config), f"file://{media}/sub/shot.png", "disabled")
    await refused(loader(make_config, ALLOWED_LOCAL_MEDIA_PATH=media), f"file://example.com{media}/x.png",
                  "local path")


async def test_file_byte_cap(make_config, media):
    await refused(loader(make_config, ALLOWED_LOCAL_MEDIA_PATH=media, MAX_IMAGE_BYTES=10),
                  f"file://{media}/sub/shot.png", "MAX_IMAGE_BYTES")


# --- http(s) URLs
class _Handler(StubHandler):
    png = image_bytes()

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/shot.png":
            self.send_body(self.png)
        elif self.path == "/big-no-length":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"\0" * 1000)
        elif self.path == "/big":
            self.send_body(b"\0" * 100_000)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/shot.png")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(2)
            self.send_body(self.png)
        else:
            self.send_response(404)
            self.end_headers()



@pytest.fixture(scope="module")
def image_server():
    with serving(_Handler) as server:
        yield server.url


async def test_remote_disabled_by_default(make_config, image_server):
    await refused(loader(make_config), f"{image_server}/shot.png", "ALLOW_REMOTE_IMAGES")


async def test_remote_fetch(make_config, image_server):
    ldr = loader(make_config, ALLOW_REMOTE_IMAGES="true", REMOTE_IMAGE_ALLOWED_HOSTS="127.0.0.1")
    local = await loader(make_config).load(data_url(_Handler.png), P)
    fetched = await ldr.load(f"{image_server}/shot.png", P)
    assert fetched.digest == local.digest
    assert (await ldr.load(f"{image_server}/redirect", P)).digest == local.digest


@pytest.mark.parametrize("path", ["/missing", "/big", "/big-no-length", "/slow"])
async def test_remote_refusals_all_say_the_same(make_config, image_server, path):
    """404, over MAX_IMAGE_BYTES (declared or counted) and a timeout: one message, so that it is no oracle."""
    ldr = loader(make_config, ALLOW_REMOTE_IMAGES="true", MAX_IMAGE_BYTES=50_000, REMOTE_IMAGE_TIMEOUT_S=0.5,
                 REMOTE_IMAGE_ALLOWED_HOSTS="127.0.0.1")
    await refused(ldr, f"{image_server}{path}", REMOTE_FAILED)
