#!/usr/bin/env python3
"""Render the tables of bench/RESULTS.md from a bench.json written by bench/engine_bench.py (same run: the naive
baseline and this engine on the same card)."""
import json
import sys


def main(path):
    r = json.load(open(path))
    v = r["versions"]
    print(f"Card: {v['gpu']} · torch {v['torch']} · transformers {v['transformers']} · Python {v['python']}\n")
    nv = r["naive_bf16"]
    print("| concurrent streams | naive `generate` bf16 tok/s (agg) | engine bf16 tok/s (agg) | × naive |"
          " engine bf16 decode tok/s per stream | engine nf4 tok/s (agg) | engine nf4 decode tok/s per stream |")
    print("|---|---|---|---|---|---|---|")
    for n in (1, 8, 32, 64):
        e, q = r["engine_none"][f"streams_{n}"], r["engine_nf4"][f"streams_{n}"]
        base = nv.get(str(n), {}).get("tok_s_agg")
        ratio = f"{e['tok_s_agg'] / base:.1f}×" if base else "–"
        print(f"| {n} | {base if base else '–'} | {e['tok_s_agg']} | {ratio} | {e['decode_tok_s_per_seq']} | "
              f"{q['tok_s_agg']} | {q['decode_tok_s_per_seq']} |")
    print("\n| TTFT, 8 closed-loop clients | engine bf16 p50 / p99 ms | engine nf4 p50 / p99 ms | prompt tokens |"
          " prefix-cached tokens (mean) |")
    print("|---|---|---|---|---|")
    for k, name in (("ttft_text_8clients", "text, 256-token prompts"),
                    ("ttft_screenshot_8clients", "1080×2400 screenshot, new each request"),
                    ("ttft_agent_shared_prefix_8clients", "agent turn: shared 1k-token system prompt + screenshot")):
        e, q = r["engine_none"][k], r["engine_nf4"][k]
        print(f"| {name} | {e['ttft_p50_ms']} / {e['ttft_p99_ms']} | {q['ttft_p50_ms']} / {q['ttft_p99_ms']} | "
              f"{e['prompt_tokens']} | {e['cached_tokens_mean']} |")
    print("\n| TTFT of one new request | engine bf16 p50 ms | engine nf4 p50 ms |")
    print("|---|---|---|")
    for k, name in (("ttft_text_idle", "text, idle engine"), ("ttft_screenshot_idle", "screenshot, idle engine"),
                    ("ttft_text_while_8_streams_decode", "text, while 8 streams decode"),
                    ("ttft_screenshot_while_8_streams_decode", "screenshot, while 8 streams decode")):
        e, q = r["engine_none"].get(k), r["engine_nf4"].get(k)
        if e and q:
            print(f"| {name} | {e['ttft_p50_ms']} | {q['ttft_p50_ms']} |")
    print(f"\nnaive `generate` bf16 TTFT (one batched prefill of 256-token prompts): "
          + ", ".join(f"batch {b}: {v['ttft_ms']} ms" for b, v in nv.items()))
    print("\n| decode step profile | B | graph replay ms | whole step ms (staging + graph + sampling + sync) |"
          " kernels per step | GPU kernel ms |")
    print("|---|---|---|---|---|---|")
    for q in ("none", "nf4"):
        for b, p in r[f"engine_{q}"]["profile"].items():
            print(f"| {'bf16' if q == 'none' else q} | {b} | {p['graph_step_ms']} | {p.get('full_step_ms', '–')} | "
                  f"{p['kernels_per_step']} | {p['gpu_kernel_ms']} |")
    print("\n| cold start, fresh process, warm page cache | exec → ready s |")
    print("|---|---|")
    for k in ("cold_naive_bf16", "cold_function_bf16", "cold_naive_nf4_quantize", "cold_function_nf4_prequantized"):
        print(f"| {k[5:]} | {r[k].get('exec_to_ready_s')} |")
    for name, lines in r.get("cold_logs", {}).items():
        print(f"\n`{name}`: " + " ".join(ln.split(": ", 1)[-1] for ln in lines if "engine ready" in ln))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/h100.json")
