"""GPU check of the prefill attention (kv_cache._causal_flash_cuda: a suffix after a cached prefix, q < L, and a
prompt from position 0, q == L) against SDPA's math kernel with a dense lower-right causal mask, at an agent turn's shapes (32 query heads, 2 KV heads, head_dim 128), and its time
against the dense-mask path the engine used before.   python3 bench/attention_check.py  -> $OUT/attention.json"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from function.engine import kv_cache  # noqa: E402

res = {}
torch.manual_seed(0)
for q, L in ((3627, 5527), (2048, 4096), (300, 5400), (5231, 5231)):
    qq = torch.randn(1, 32, q, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, L, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, L, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.arange(L, device="cuda")
    mask = (keys.view(1, L) <= (L - q + torch.arange(q, device="cuda")).view(q, 1)).view(1, 1, q, L)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(qq.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    ref = ref.transpose(1, 2)

    def ours():
        return kv_cache._causal_flash_cuda(qq, k, v, None)[0]

    def dense():
        return F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, enable_gqa=True)

    out = ours()
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    times = {}
    for name, fn in (("ours", ours), ("dense_mask", dense)):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        times[name + "_ms"] = round((time.perf_counter() - t) * 100, 3)
    res[f"q{q}_L{L}"] = {"max_rel_err": err, "flash_gqa_direct": kv_cache._FLASH_GQA[:1], **times}
    print(res, flush=True)
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "attention.json"), "w"), indent=1)
