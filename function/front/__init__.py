"""The response cache's HTTP face (`CacheLayer`), and the cache-front role built from it (`build_front_app`).

By concern: `layer` (the cache tier: CacheLayer, install), `entries` (a cached answer replayed as SSE, a live answer
watched for its entry), `proxy` (ModelProxy to MODEL_URL), `app` (the cache-front role's app). The probes and the
HTTP metrics are function/http_common.py's, shared with the model app.

`CacheLayer` is ASGI middleware for POST /v1/chat/completions, one code path for both forms of the cache:
- model role (in-process cache): `install` puts it inside the model's app, so a miss goes on to the chat route;
- cache-front role: `build_front_app` puts it in front of `ModelProxy`, which forwards a miss to MODEL_URL with httpx,
  passing the answer through chunk by chunk. A hit needs no model service at all; this module never imports torch.

Per request: `Cache-Control: no-cache` skips the lookup, `no-store` the write -> parse the body, check the policy,
decode images for their pixel digests -> the key -> a hit is replayed as JSON, or as SSE when `stream` is true (the
live answer's chunk models: role chunk, reasoning, content, finish chunk, usage chunk when asked, [DONE]) -> a miss
joins an identical request in flight (single flight) or leads one: it is forwarded, and its answer is stored only
when complete: status 200, finish_reason stop or length, usage, sent to its end (an error chunk, an abort or a
client gone leaves nothing). In the model role the serving layer records the entry from the objects it produces
(function.cache.Recorder: the response, or the chunks and the stream's usage, which it hands over whether or not
the client asked), so nothing sent is parsed back. Behind the cache front the answer arrives as bytes, which are
parsed as they go by (JSON or SSE); a streamed miss is forwarded with `stream_options.include_usage` so its entry has
usage, and the usage chunk is removed again unless the client asked.
Anything unexpected on the cache's side (unparseable body, unreadable image, a store down) bypasses or misses the
cache: the app behind answers, with its own errors. Every chat answer carries `X-Cache: hit|miss|bypass`.

Bounded and private (docs/security.md): a large body is parsed in a worker thread; a request with more images than
MAX_IMAGES_PER_REQUEST is passed on without loading one (the app refuses it); keying a request (loading its images)
obeys REQUEST_TIMEOUT_S (504) and stops when the client leaves. The images loaded for the key are handed to the app
behind (`images.prefetched`), so a remote image is fetched once and the model sees the bytes the key was made from;
the cache front sends them on to the model service as data: URLs for the same reason. The key includes the API
key's hash (function/api/auth.py). A single-flight leader's answer is teed into the cache as the app produces it,
not at the pace of the leader's client: a client that does not read cannot hold up the identical requests waiting
for it. The front's proxy keeps no cookies and drops hop-by-hop headers (those named in Connection too) both ways;
the request gate bounds every body on every path.
"""
from .app import aclose, build_front_app
from .entries import Capture, sse_events
from .layer import CHAT_PATH, CacheLayer, install
from .proxy import ModelProxy

__all__ = ["CHAT_PATH", "CacheLayer", "Capture", "ModelProxy", "aclose", "build_front_app", "install", "sse_events"]
