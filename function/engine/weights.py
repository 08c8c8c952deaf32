"""Reading safetensors shards straight into device memory on background threads, while the main load thread imports
transformers (the slowest part of a cold start) and the processor loads.

Each shard's data section goes into one device buffer: reader threads `preadv` 32 MiB chunks of the file into pinned
host buffers (two per thread, so the next read overlaps the previous copy) and copy them to the device on their own
CUDA stream. Every tensor is then a view of its shard's buffer where it starts 16-byte aligned (most do; the rest
are copied, see TENSOR_ALIGN), so nothing else is copied twice; the views are handed to `from_pretrained(state_dict=...)`, which keeps transformers' own
key renaming, tied weights, buffers and (pre-quantized) quantizer handling. On CPU the chunks are read straight into
the buffer.

Plain Python + torch + the safetensors file format (an 8-byte header length, a JSON header, the data); no
transformers, so it can start before transformers is imported.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20
# H200 host, 20.6 GB from the page cache (bench/read_probe.py, 2026-12-03): 2 threads 9.6 GB/s, 4: 14.5, 8: 22.7,
# 12: 22.4; preadv and the copies release the GIL, so threads beyond the pod's cores still overlap their I/O
READER_THREADS = 8
# safetensors dtype names -> torch dtype attribute names
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
           "I16": "int16", "I32": "int32", "I64": "int64", "U16": "uint16", "U32": "uint32", "U64": "uint64",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# Writers align each tensor to its dtype only, so after an odd-sized one (a bitsandbytes quant_state blob, a uint8
# vector) the next ones start anywhere; CUDA kernels with vector loads want 16 bytes (bitsandbytes' 4-bit ones
# fault on less: "misaligned address" on the H200, bench/RESULTS.md session 5), so such tensors are copied.
TENSOR_ALIGN = 16


@dataclass
class Shard:
    path: Path
    data_start: int                                 # file offset of the data section
    data_bytes: int
    tensors: dict[str, tuple[str, list[int], int, int]] = field(default_factory=dict)  # name -> dtype, shape, begin, end


def read_header(path: Path) -> Shard:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    tensors = {k: (v["dtype"], list(v["shape"]), int(v["data_offsets"][0]), int(v["data_offsets"][1]))
               for k, v in header.items()}
    size = max((t[3] for t in tensors.values()), default=0)
    return Shard(path=path, data_start=8 + n, data_bytes=size, tensors=tensors)


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(read_header(p).data_bytes for p in shard_files(model_dir))


class WeightReader:
    """`start()` returns at once; `result()` waits and returns the state dict (tensors on `device`), or None when
    the reader declined (`declined` says why: too little free device memory for the weights plus transformers'
    allocator warm-up), or raises what the reading raised. `stats` has the bytes, seconds and GB/s."""

    def __init__(self, model_dir: Path, device: str, *, threads: int = READER_THREADS,
                 chunk_bytes: int = CHUNK_BYTES, headroom_bytes: int = 2 << 30):
        self.model_dir = Path(model_dir)
        self.device = device
        self.threads = max(1, threads)
        self.chunk_bytes = chunk_bytes
        self.headroom_bytes = headroom_bytes
        self.declined: str | None = None
        self.stats: dict[str, float] = {}
        self._result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weight-reader", daemon=True)

    def start(self) -> "WeightReader":
        self._thread.start()
        return self

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self) -> None:
        try:
            self._result = self._read()
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits in result()
            self._error = e

    def _read(self):
        import torch

        dev = torch.device(self.device)
        if dev.type == "cuda":
            t = time.perf_counter()
            torch.zeros(1, device=dev)          # CUDA context creation, here rather than on the import thread
            self.stats["cuda_init_s"] = round(time.perf_counter() - t, 3)
        t0 = time.perf_counter()
        shards = [read_header(p) for p in shard_files(self.model_dir)]
        total = sum(s.data_bytes for s in shards)
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            # from_pretrained's caching-allocator warm-up allocates (then frees) as much again
            need = 2 * total + self.headroom_bytes
            if free < need:
                self.declined = (f"{free / 2**30:.1f} GiB free on {dev}, {need / 2**30:.1f} GiB needed to read the "
                                 "weights ahead of transformers")
                return None
        buffers = [torch.empty(s.data_bytes, dtype=torch.uint8, device=dev) for s in shards]
        jobs = [(i, off, min(self.chunk_bytes, s.data_bytes - off))
                for i, s in enumerate(shards) for off in range(0, s.data_bytes, self.chunk_bytes)]
        fds = [os.open(s.path, os.O_RDONLY) for s in shards]
        try:
            per_thread = [jobs[k::self.threads] for k in range(self.threads)]
            with ThreadPoolExecutor(self.threads, thread_name_prefix="weight-read") as pool:
                list(pool.map(lambda js: self._copy(torch, dev, shards, fds, buffers, js), per_thread))
        finally:
            for fd in fds:
                os.close(fd)
        state = {}
        for s, buf in zip(shards, buffers):
            for name, (dt, shape, begin, end) in s.tensors.items():
                dtype = getattr(torch, _DTYPES[dt])
                item = torch.empty((), dtype=dtype).element_size()
                raw = buf[begin:end]
                if begin % max(item, TENSOR_ALIGN):
                    raw = raw.clone()           # a fresh allocation: aligned
                state[name] = raw.view(dtype).view(shape)
        secs = time.perf_counter() - t0
        self.stats.update(bytes=total, read_s=round(secs, 3), gbps=round(total / max(secs, 1e-9) / 1e9, 2),
                          shards=len(shards), tensors=len(state))
        return state

    def _copy(self, torch, dev, shards, fds, buffers, jobs) -> None:
        if not jobs:
            return
        if dev.type != "cuda":
            for i, off, n in jobs:
                _pread_into(fds[i], buffers[i][off:off + n].numpy(), shards[i].data_start + off)
            return
        stream = torch.cuda.Stream(dev)
        staging = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        events: list = [None, None]
        for k, (i, off, n) in enumerate(jobs):
            b = k % 2
            if events[b] is not None:
                events[b].synchronize()          # the copy out of this staging buffer has finished
            _pread_into(fds[i], staging[b][:n].numpy(), shards[i].data_start + off)
            with torch.cuda.stream(stream):
                buffers[i][off:off + n].copy_(staging[b][:n], non_blocking=True)
                events[b] = torch.cuda.Event()
                events[b].record(stream)
        stream.synchronize()


def _pread_into(fd: int, array, offset: int) -> None:
    """Fill a writable uint8 numpy array from `fd` at `offset` (preadv releases the GIL)."""
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at offset {offset + done}")
        done += n


SHARD_BYTES = 4 * 2**30


def save_shards(state: dict, out: Path, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write a state dict as safetensors shards plus `model.safetensors.index.json` (transformers' layout, so
    from_pretrained reads the directory too) into `out`; the file names. A tensor that shares another's storage
    (a tied weight) is written once: loading re-ties it."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[tuple] = set()
    shards: list[dict] = [{}]
    size = total = 0
    for key, t in state.items():
        if t.device.type == "meta":
            raise RuntimeError(f"save_shards: {key} is on the meta device")
        where = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and where in seen:
            continue
        seen.add(where)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
        total += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, str(out / fname),
                  metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files


def is_view(t) -> bool:
    """Whether `t` is a view of a larger storage (e.g. of weights.WeightReader's shard buffers), which a module
    swap alone does not free."""
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def compact_views(model, device=None, skip: tuple[type, ...] = ()) -> int:
    """Copy every parameter and buffer that is a view of a larger storage into a tensor of its own (ties kept:
    one copy per viewed memory), so the storages those views kept alive (the read-ahead's shard buffers, whose
    bf16 decoder weights the conversion replaced) are freed. With `device`, tensors elsewhere are moved there the
    same way. Modules of the `skip` types are left alone (bitsandbytes' packed weights, which Module.to or a plain
    copy would not keep). Returns the bytes copied."""
    from torch import nn

    copies: dict[tuple, object] = {}
    params: dict[int, nn.Parameter] = {}
    copied = 0
    for mod in model.modules():
        if skip and isinstance(mod, skip):
            continue
        for table in (mod._parameters, mod._buffers):
            for key, t in list(table.items()):
                if t is None or t.device.type == "meta":
                    continue
                moving = device is not None and t.device != device
                if not (moving or is_view(t)):
                    continue
                if isinstance(t, nn.Parameter) and id(t) in params:
                    table[key] = params[id(t)]
                    continue
                where = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                if where not in copies:
                    copies[where] = t.detach().to(device, copy=True) if moving else t.detach().clone()
                    copied += t.numel() * t.element_size()
                c = copies[where]
                if isinstance(t, nn.Parameter):
                    params[id(t)] = table[key] = nn.Parameter(c, requires_grad=t.requires_grad)
                else:
                    table[key] = c
    return copied
