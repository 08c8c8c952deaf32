#!/usr/bin/env bash
# One device call of the H200 measurement plan: bench/run_call.sh perf | probe | soak   (results under $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
O=$OUT
mkdir -p "$O/a" "$O/b" "$O/c" "$O/d"
case "${1:-perf}" in
  perf)
    OUT=$O timeout 45 python3 bench/attention_check.py
    OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/c timeout 85 python3 bench/fp8_bench.py gemm,accuracy 80
    OUT=$O/a timeout 160 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 25 --deadline 155
    OUT=$O/b timeout 175 python3 bench/agent_bench.py agent --quant fp8 --clients 1,8,32 --turns-s 25 --deadline 170
    ;;
  probe)
    OUT=$O timeout 45 python3 bench/attention_check.py
    OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O timeout 130 python3 bench/prefill_probe.py
    OUT=$O/b timeout 95 python3 bench/agent_bench.py naive --naive-turns 3 --deadline 90
    OUT=$O/a timeout 165 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 25 --deadline 160
    ;;
  soak)
    OUT=$O/a timeout 70 python3 bench/agent_bench.py build
    OUT=$O timeout 70 python3 bench/decode_probe.py
    OUT=$O/c timeout 80 python3 bench/agent_bench.py graphcheck --deadline 78
    OUT=$O/b timeout 240 python3 bench/agent_bench.py soak --quant fp8 --minutes 2.8 --deadline 238
    ;;
  soak2)     # bf16 and nf4 side by side on one card (each GPU_MEMORY_UTILIZATION=0.45): survival, not speed
    OUT=$O/a timeout 70 python3 bench/agent_bench.py build
    OUT=$O timeout 60 python3 bench/import_probe.py
    OUT=$O/b timeout 420 python3 bench/agent_bench.py soak --quant none --minutes 5 --deadline 410 \
      --env GPU_MEMORY_UTILIZATION=0.45 > "$O/b/soak.out" 2>&1 &
    sleep 25
    OUT=$O/c timeout 400 python3 bench/agent_bench.py soak --quant nf4 --minutes 5 --deadline 390 \
      --cache-dir /tmp/mc-nf4 --env GPU_MEMORY_UTILIZATION=0.45 > "$O/c/soak.out" 2>&1 &
    wait
    tail -c 3000 "$O/b/soak.out"; tail -c 3000 "$O/c/soak.out"
    ;;
  fp8)       # bf16 vs fp8 agent turns in one run, then fresh starts in a row
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 150 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 20 --deadline 145
    OUT=$O/b timeout 175 python3 bench/agent_bench.py agent --quant fp8 --clients 1,8,32 --turns-s 20 --deadline 170
    OUT=$O/c timeout 130 python3 bench/agent_bench.py starts --n 6 --deadline 125
    ;;
  ab)        # call 9: idle-capture debounce; PREFILL_ENCODER_TOKENS 2048 (default) vs 0 (call 8) vs 65536 (call 7); naive
    OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    sync
    OUT=$O/a timeout 110 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 20 --deadline 105
    OUT=$O/b timeout 110 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 20 --deadline 105 \
      --env PREFILL_ENCODER_TOKENS=0
    OUT=$O/c timeout 110 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 20 --deadline 105 \
      --env PREFILL_ENCODER_TOKENS=65536
    OUT=$O/d timeout 95 python3 bench/agent_bench.py naive --naive-turns 3 --deadline 90
    ;;
  host)      # call 13: stream coalescing, new tree (here) against the tree before it (/tmp/ho, this call's bench files)
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    mkdir -p "$O/e"
    OUT=$O/a timeout 80 python3 bench/agent_bench.py short --clients 64 --short-rounds 3 --deadline 75
    (cd /tmp/ho && OUT=$O/b timeout 80 python3 bench/agent_bench.py short --clients 64 --short-rounds 3 --deadline 75)
    OUT=$O/c timeout 100 python3 bench/agent_bench.py agent --quant none --clients 32 --turns-s 55 --deadline 95
    (cd /tmp/ho && OUT=$O/d timeout 100 python3 bench/agent_bench.py agent --quant none --clients 32 --turns-s 55 \
      --deadline 95)
    OUT=$O/e timeout 85 python3 bench/agent_bench.py agent --quant none --clients 1,8 --turns-s 25 --deadline 80
    ;;
  gil)       # call 14: GIL switch interval 5 ms (default) vs 1 ms on 64 short chats; bf16 vs fp8 (small-M kernel)
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 85 python3 bench/agent_bench.py all --sections agent,short --clients 1 --turns-s 15 \
      --short-rounds 2 --deadline 80
    BENCH_GIL_SWITCH_S=0.001 OUT=$O/b timeout 60 python3 bench/agent_bench.py short --clients 64 --short-rounds 2 \
      --deadline 55
    OUT=$O/c timeout 110 python3 bench/agent_bench.py all --quant fp8 --sections agent,short --clients 1 \
      --turns-s 15 --short-rounds 2 --deadline 105
    ;;
  next1)     # planned: the engine thread's host profile at 64 rows; bf16 at 8 and 32 agents and 64 short chats
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 110 python3 bench/host_probe.py 64 256
    OUT=$O/b timeout 230 python3 bench/agent_bench.py all --sections agent,short --clients 8,32 --turns-s 55 \
      --short-rounds 2 --deadline 225
    ;;
  next2)     # planned: the same rows in fp8 (small-M kernel; the first start converts, writes its copy after ready)
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/c timeout 280 python3 bench/agent_bench.py all --quant fp8 --sections agent,short --clients 1,8,32 \
      --turns-s 55 --short-rounds 2 --deadline 275
    OUT=$O/d timeout 150 python3 bench/agent_bench.py soak --quant fp8 --minutes 2 --deadline 145
    ;;
  overlap)   # call 17: overlapped engine loop (here) against the tree before it (/tmp/ho); then a soak of this tree
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    mkdir -p "$O/e"
    OUT=$O/a timeout 185 python3 bench/agent_bench.py all --sections agent,short --clients 1,8,32 --turns-s 40 \
      --short-rounds 2 --deadline 180
    (cd /tmp/ho && OUT=$O/b timeout 60 python3 bench/agent_bench.py short --clients 64 --short-rounds 2 --deadline 55)
    (cd /tmp/ho && OUT=$O/c timeout 70 python3 bench/agent_bench.py agent --quant none --clients 32 --turns-s 35 \
      --deadline 65)
    OUT=$O/d timeout 150 python3 bench/agent_bench.py soak --quant none --minutes 2 --deadline 145
    ;;
  next3)     # call 18: 64 short chats, overlapped loop (here) vs the tree before it (/tmp/ho); fp8 prefill GEMMs; fp8
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 50 python3 bench/agent_bench.py short --clients 64 --short-rounds 2 --deadline 48
    (cd /tmp/ho && OUT=$O/b timeout 50 python3 bench/agent_bench.py short --clients 64 --short-rounds 2 --deadline 48)
    OUT=$O/c timeout 45 python3 bench/fp8_bench.py prefill 40
    OUT=$O/d timeout 110 python3 bench/agent_bench.py all --quant fp8 --sections agent,short --clients 32 \
      --turns-s 30 --short-rounds 1 --deadline 105
    ;;
  ab32)      # call 10: the 32-agent row of the A/B with enough turns, then a soak at the defaults
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    for e in a:2048 b:0 c:65536; do
      OUT=$O/${e%%:*} timeout 105 python3 bench/agent_bench.py agent --quant none --clients 32 --turns-s 55 \
        --deadline 100 --env PREFILL_ENCODER_TOKENS=${e#*:}
    done
    OUT=$O/d timeout 200 python3 bench/agent_bench.py soak --quant none --minutes 2.6 --deadline 195
    ;;
  native)    # call 19: native GLM-4.1V vs transformers (numerics, vision, prefill), weight read speed, exec -> first
             # token native / transformers / naive, agent turns and short chats on the native default
    OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    sync
    OUT=$O timeout 100 python3 bench/native_check.py
    OUT=$O timeout 70 python3 bench/read_probe.py /tmp/glm9b 2,4,8,12 32,64
    OUT=$O/b timeout 110 python3 bench/cold_bench.py --quant none --repeat 2 --timeout 60 > "$O/b/cold.out" 2>&1
    tail -c 1500 "$O/b/cold.out"
    MODEL_IMPL=transformers OUT=$O/c timeout 60 python3 bench/cold_bench.py --quant none --skip-naive --timeout 55 \
      > "$O/c/cold.out" 2>&1
    tail -c 800 "$O/c/cold.out"
    OUT=$O/d timeout 175 python3 bench/agent_bench.py all --sections agent,short --clients 1,8,32 --turns-s 25 \
      --short-rounds 2 --deadline 170
    ;;
  native2)   # call 20: native default (vision on SDPA, 8 reader threads, 5 graphs before ready) vs MODEL_IMPL=transformers
             # in the same call; a soak of the native default; fresh starts
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 135 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 25 --deadline 130
    OUT=$O/b timeout 135 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 25 --deadline 130 \
      --env MODEL_IMPL=transformers
    OUT=$O/c timeout 150 python3 bench/agent_bench.py soak --quant none --minutes 2 --deadline 145
    OUT=$O/d timeout 110 python3 bench/agent_bench.py starts --n 7 --deadline 105
    ;;
  split)     # session 3 call 1: split vision encodes (default: PREFILL_ENCODER_TOKENS=1024, split) vs a 1024-token text
             # chunk vs the whole-encode rule (PREFILL_SPLIT_ENCODES=false, 2048 image tokens), naive in the same call
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 135 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 25 --deadline 130
    OUT=$O/b timeout 90 python3 bench/agent_bench.py agent --quant none --clients 8,32 --turns-s 25 --deadline 85 \
      --env PREFILL_CHUNK_TOKENS=1024
    OUT=$O/c timeout 90 python3 bench/agent_bench.py agent --quant none --clients 8,32 --turns-s 25 --deadline 85 \
      --env PREFILL_SPLIT_ENCODES=false --env PREFILL_ENCODER_TOKENS=2048
    OUT=$O/d timeout 80 python3 bench/agent_bench.py naive --naive-turns 3 --deadline 75
    ;;
  fp8s3)     # session 3 call 2: fp8 with warmed kernels and probes beside the load: first (converting) start on an
             # empty Triton cache, pre-quantized starts, then bf16 and fp8 agent turns in the same call
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 80 python3 bench/agent_bench.py starts --quant fp8 --n 1 --deadline 75
    MODEL_CACHE_DIR=/tmp/modelcache timeout 90 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization fp8 2>&1 | tail -3
    OUT=$O/b timeout 75 python3 bench/agent_bench.py starts --quant fp8 --n 3 --deadline 70
    OUT=$O/c timeout 115 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 20 --deadline 110
    OUT=$O/d timeout 120 python3 bench/agent_bench.py agent --quant fp8 --clients 1,8,32 --turns-s 20 --deadline 115
    ;;
  s4c2)      # session 4 call 2: 64 short chats bf16 vs fp8, exec -> first token vs naive, a soak of the default
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 80 python3 bench/agent_bench.py short --quant none --clients 64 --short-rounds 2 --deadline 75
    OUT=$O/b timeout 90 python3 bench/agent_bench.py short --quant fp8 --clients 64 --short-rounds 2 --deadline 85
    OUT=$O/c timeout 100 python3 bench/cold_bench.py --quant none --timeout 80 > "$O/c/cold.out" 2>&1
    tail -c 1500 "$O/c/cold.out"
    OUT=$O/d timeout 230 python3 bench/agent_bench.py soak --quant none --minutes 3.2 --deadline 225
    ;;
  s4c3)      # session 4 call 3: a long prompt alone in an idle step; after-ready work waits for quiet (first requests
             # after ready); bf16 agent turns, fp8 first start, bf16 starts, exec -> first token vs naive
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 135 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 25 --deadline 130
    OUT=$O/b timeout 75 python3 bench/agent_bench.py starts --quant fp8 --n 1 --deadline 70
    OUT=$O/d timeout 60 python3 bench/agent_bench.py starts --n 4 --deadline 55
    OUT=$O/c timeout 150 python3 bench/cold_bench.py --quant none --timeout 80 > "$O/c/cold.out" 2>&1
    tail -c 1500 "$O/c/cold.out"
    ;;
  s4c4)      # session 4 call 4: fp8 pre-quantized starts (first requests after ready), a soak of fp8 with this tree's
             # scheduler, fp8 accuracy against bf16 and one-stream decode steps
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    MODEL_CACHE_DIR=/tmp/modelcache timeout 90 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization fp8 2>&1 | tail -3
    OUT=$O/a timeout 55 python3 bench/agent_bench.py starts --quant fp8 --n 3 --deadline 50
    OUT=$O/b timeout 175 python3 bench/agent_bench.py soak --quant fp8 --minutes 2.4 --deadline 170
    OUT=$O/c timeout 130 python3 bench/fp8_bench.py accuracy,decode 125
    ;;
  s5c1)      # session 5 call 1: kernel warm-up after ready (first fp8 start with an empty Triton cache vs bf16
             # starts, same call), fp8 pre-quantized starts, fp8 under load right after a start on an empty cache,
             # fp8 accuracy against bf16 and one-stream decode steps
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 50 python3 bench/agent_bench.py starts --n 2 --deadline 45
    OUT=$O/a timeout 50 python3 bench/agent_bench.py starts --quant fp8 --n 1 --env TRITON_CACHE_DIR=/tmp/tc1 \
      --deadline 45
    MODEL_CACHE_DIR=/tmp/modelcache TRITON_CACHE_DIR=/tmp/tc1 timeout 90 python3 scripts/prequantize.py \
      --model-path /tmp/glm9b --quantization fp8 2>&1 | tail -3
    OUT=$O/b timeout 50 python3 bench/agent_bench.py starts --quant fp8 --n 2 --env TRITON_CACHE_DIR=/tmp/tc1 \
      --deadline 45
    OUT=$O/c timeout 130 python3 bench/fp8_bench.py accuracy,decode 125
    OUT=$O/d timeout 100 python3 bench/agent_bench.py agent --quant fp8 --clients 1,8 --turns-s 20 \
      --env TRITON_CACHE_DIR=/tmp/tc2 --deadline 95
    ;;
  s5c2)      # session 5 call 2: bf16 starts in a row beside the first fp8 start (converts, empty Triton cache) and
             # nf4's first and pre-quantized starts; then a soak of fp8 on an empty Triton cache (the kernel
             # warm-up runs in the idle gaps, traffic resumes in the middle of it)
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 95 python3 bench/agent_bench.py starts --n 3 --deadline 90
    OUT=$O/a timeout 50 python3 bench/agent_bench.py starts --quant fp8 --n 1 --env TRITON_CACHE_DIR=/tmp/tc3 \
      --deadline 45
    OUT=$O/b timeout 60 python3 bench/agent_bench.py starts --quant nf4 --n 1 --deadline 55
    MODEL_CACHE_DIR=/tmp/modelcache timeout 90 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization nf4 2>&1 | tail -2
    OUT=$O/b timeout 80 python3 bench/agent_bench.py starts --quant nf4 --n 2 --deadline 75
    OUT=$O/c timeout 200 python3 bench/agent_bench.py soak --quant fp8 --minutes 2.5 --env TRITON_CACHE_DIR=/tmp/tc4 \
      --deadline 195
    ;;
  s6c1)      # session 6 call 1: nf4 pre-quantized starts (16-byte aligned tensors), exec -> first token vs naive in
             # the same call, a soak of fp8 on an empty Triton cache with the image's allocator setting (RSS)
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    MODEL_CACHE_DIR=/tmp/modelcache timeout 60 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization nf4 2>&1 | tail -2
    OUT=$O/a timeout 80 python3 bench/agent_bench.py starts --quant nf4 --n 2 --deadline 75
    OUT=$O/b timeout 130 python3 bench/cold_bench.py --quant none --timeout 80 > "$O/b/cold.out" 2>&1
    tail -c 1500 "$O/b/cold.out"
    OUT=$O/c timeout 200 python3 bench/agent_bench.py soak --quant fp8 --minutes 2.5 --env TRITON_CACHE_DIR=/tmp/tc5 \
      --deadline 195
    ;;
  s7c1)      # session 7 call 1: every start kind in one run beside naive (bf16 and nf4 quantizing while loading):
             # first starts that quantize and write the copy, pre-quantized starts (nf4 now on the native model),
             # a cold page cache bf16 start; then nf4 agent turns on the native model under load
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/b timeout 250 python3 bench/cold_bench.py --quant none,nf4,fp8 --timeout 90 \
      --cache-dir /tmp/modelcache > "$O/b/cold.out" 2>&1
    tail -c 2500 "$O/b/cold.out"
    OUT=$O/c timeout 140 python3 bench/cold_bench.py --quant none,nf4,fp8 --cold --skip-naive --timeout 45 \
      --cache-dir /tmp/modelcache > "$O/c/cold.out" 2>&1
    tail -c 2500 "$O/c/cold.out"
    OUT=$O/d timeout 90 python3 bench/agent_bench.py agent --quant nf4 --clients 1,8 --turns-s 20 --deadline 85
    ;;
  s9c3)      # session 9 device call 4: the rope check moved beside the weight read; bf16 starts on an empty Triton
             # cache with the kernels and without; agent turns 1/8/32 + 64 short chats with and without, same call
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    TRITON_CACHE_DIR=/tmp/tc-a OUT=$O/c timeout 72 python3 bench/agent_bench.py starts --n 3 --deadline 70
    TRITON_CACHE_DIR=/tmp/tc-b OUT=$O/d timeout 72 python3 bench/agent_bench.py starts --n 3 --deadline 70 \
      --env ROTARY_KERNELS=false
    grep -h "engine ready in\|rotary kernels" "$O"/c/server-starts.log | cut -c1-700
    OUT=$O/a timeout 155 python3 bench/agent_bench.py all --sections agent,short --clients 1,8,32 --turns-s 20 \
      --short-rounds 1 --deadline 150 --env ROTARY_KERNELS=false
    OUT=$O/b timeout 155 python3 bench/agent_bench.py all --sections agent,short --clients 1,8,32 --turns-s 20 \
      --short-rounds 1 --deadline 150
    ;;
  s9c2)      # session 9 call 2 (device call 3): the rotary kernels (engine/rope.py): check on the card, then agent
             # turns 1/8/32 and 64 short chats with them and without (ROTARY_KERNELS=false), same call; fp8 1/8;
             # bf16 starts on an empty Triton cache (the first compiles the kernels)
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O timeout 60 python3 bench/rope_check.py 2>&1 | tail -2 | cut -c1-1500
    OUT=$O/a timeout 155 python3 bench/agent_bench.py all --sections agent,short --clients 1,8,32 --turns-s 20 \
      --short-rounds 1 --deadline 150
    OUT=$O/b timeout 155 python3 bench/agent_bench.py all --sections agent,short --clients 1,8,32 --turns-s 20 \
      --short-rounds 1 --deadline 150 --env ROTARY_KERNELS=false
    OUT=$O/c timeout 75 python3 bench/agent_bench.py agent --quant fp8 --clients 1,8 --turns-s 20 --deadline 72
    TRITON_CACHE_DIR=/tmp/tc-fresh OUT=$O/d timeout 72 python3 bench/agent_bench.py starts --n 3 --deadline 70
    grep -h "engine ready in\|rotary kernels" "$O"/d/server-starts.log | cut -c1-600
    ;;
  s9c1)      # session 9 call 1: where an agent turn's GPU time goes, by phase (bf16, fp8, fp8 with the vision tower),
             # one turn profiled and 8 in-process agents; then 8 agents through HTTP: closed loop vs 1 s phone action
             # time (bf16), and fp8 with 4096-token chunks beside decode
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 100 python3 bench/prefill_probe.py 95 --agents 8 --window 20 --tag bf16 2>&1 | grep -v USDT | tail -4
    OUT=$O/a timeout 100 python3 bench/prefill_probe.py 95 --quant fp8 --agents 8 --window 20 --skip processors,sdpa \
      --tag fp8 2>&1 | grep -v USDT | tail -4
    OUT=$O/a timeout 100 python3 bench/prefill_probe.py 95 --quant fp8 --env QUANTIZE_VISION=true --agents 8 \
      --window 20 --skip processors,sdpa --tag fp8vis 2>&1 | grep -v USDT | tail -4
    OUT=$O/b timeout 80 python3 bench/agent_bench.py agent --clients 8 --turns-s 25 --deadline 76
    OUT=$O/c timeout 80 python3 bench/agent_bench.py agent --clients 8 --turns-s 25 --think-s 1.0 --deadline 76
    OUT=$O/d timeout 80 python3 bench/agent_bench.py agent --quant fp8 --clients 8 --turns-s 25 --deadline 76 \
      --env PREFILL_CHUNK_TOKENS=4096
    ;;
  s8c5)      # session 8 call 5: the final tree's starts in a row, bf16, nf4 and fp8 pre-quantized; naive bf16 last
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    for q in nf4 fp8; do
      MODEL_CACHE_DIR=/tmp/mc-5 timeout 60 python3 scripts/prequantize.py --model-path /tmp/glm9b \
        --quantization $q > "$O/a/prequantize-$q.log" 2>&1; echo "prequantize $q rc=$?"
    done
    OUT=$O/b timeout 70 python3 bench/agent_bench.py starts --quant none --n 3 --cache-dir /tmp/mc-5 --deadline 68
    OUT=$O/c timeout 70 python3 bench/agent_bench.py starts --quant nf4 --n 3 --cache-dir /tmp/mc-5 --deadline 68
    OUT=$O/d timeout 70 python3 bench/agent_bench.py starts --quant fp8 --n 3 --cache-dir /tmp/mc-5 --deadline 68
    grep -h "engine ready in" "$O"/b/server-starts.log "$O"/c/server-starts.log "$O"/d/server-starts.log | cut -c1-400
    mkdir -p "$O/e"; OUT=$O/e timeout 75 python3 bench/cold_bench.py --quant none --timeout 45 --cache-dir /tmp/mc-5 \
      > "$O/e/cold.out" 2>&1; tail -c 1200 "$O/e/cold.out"
    ;;
  s8c4)      # session 8 call 4: bitsandbytes' kernels registered without the lazy dynamo import; bf16 and nf4
             # (first start quantizing natively, then pre-quantized) beside naive bf16 and nf4; starts in a row
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/b timeout 250 python3 bench/cold_bench.py --quant none,nf4 --timeout 70 \
      --cache-dir /tmp/mc-n4 > "$O/b/cold.out" 2>&1
    tail -c 1500 "$O/b/cold.out"
    OUT=$O/c timeout 75 python3 bench/agent_bench.py starts --quant nf4 --n 3 --cache-dir /tmp/mc-n4 --deadline 70
    OUT=$O/d timeout 45 python3 bench/agent_bench.py starts --quant none --n 2 --cache-dir /tmp/mc-n4 --deadline 40
    grep -h "engine ready in" "$O"/c/server-starts.log "$O"/d/server-starts.log | cut -c1-700
    ;;
  s8c3)      # session 8 call 3: bitsandbytes' first-kernel cost in fresh processes (driver JIT cache?)
    OUT=$O/a timeout 200 python3 bench/bnb_jit_probe.py
    ;;
  s8c2)      # session 8 call 2: where a first nf4 start's 5.6 s of nf4_quantize goes; the native prequantize script;
             # naive bf16 beside our bf16 start, then fresh nf4 pre-quantized and bf16 starts in a row
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 70 python3 bench/nf4_probe.py --quantize /tmp/glm9b 2>&1 | head -c 6000
    t0=$(date +%s%N)
    MODEL_CACHE_DIR=/tmp/mc-n1 timeout 90 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization nf4 > "$O/a/prequantize.log" 2>&1; echo "prequantize rc=$? wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
    tail -c 600 "$O/a/prequantize.log"
    OUT=$O/b timeout 100 python3 bench/cold_bench.py --quant none --timeout 60 --cache-dir /tmp/mc-n1 \
      > "$O/b/cold.out" 2>&1
    tail -c 1200 "$O/b/cold.out"
    OUT=$O/c timeout 100 python3 bench/agent_bench.py starts --quant nf4 --n 3 --cache-dir /tmp/mc-n1 --deadline 95
    OUT=$O/d timeout 80 python3 bench/agent_bench.py starts --quant none --n 3 --cache-dir /tmp/mc-n1 --deadline 75
    grep -h "engine ready in" "$O"/c/server-starts.log "$O"/d/server-starts.log | cut -c1-900
    ;;
  s8c1)      # session 8 call 1: nf4 first starts quantize on the native model (no transformers); bf16, nf4 first
             # and pre-quantized starts beside naive bf16 and nf4; then agent turns on a first-start nf4 server
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/b timeout 250 python3 bench/cold_bench.py --quant none,nf4 --timeout 80 \
      --cache-dir /tmp/mc-n1 > "$O/b/cold.out" 2>&1
    tail -c 2500 "$O/b/cold.out"
    OUT=$O/c timeout 80 python3 bench/cold_bench.py --quant nf4,none --skip-naive --timeout 60 \
      --cache-dir /tmp/mc-n1 > "$O/c/cold.out" 2>&1
    tail -c 1500 "$O/c/cold.out"
    OUT=$O/d timeout 100 python3 bench/agent_bench.py agent --quant nf4 --clients 1,8 --turns-s 15 --deadline 95 \
      --cache-dir /tmp/mc-n2
    ;;
  s7c2)      # session 7 call 2: the native nf4 load profiled; fp8 first and pre-quantized starts beside bf16's
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    MODEL_CACHE_DIR=/tmp/modelcache timeout 60 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization nf4 2>&1 | tail -1
    OUT=$O/a timeout 60 python3 bench/nf4_probe.py
    OUT=$O/b timeout 150 python3 bench/cold_bench.py --quant none,fp8 --skip-naive --timeout 60 \
      --cache-dir /tmp/mc-fp8 > "$O/b/cold.out" 2>&1
    tail -c 1500 "$O/b/cold.out"
    ;;
  fp8starts) # call 22: fp8 starts in a row: the first converts and writes the pre-quantized copy, the rest load it
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 70 python3 bench/agent_bench.py starts --quant fp8 --n 1 --deadline 65
    MODEL_CACHE_DIR=/tmp/modelcache timeout 90 python3 scripts/prequantize.py --model-path /tmp/glm9b \
      --quantization fp8 2>&1 | tail -5
    OUT=$O/b timeout 100 python3 bench/agent_bench.py starts --quant fp8 --n 4 --deadline 95
    ;;
  starts20)  # call 21: fresh starts of the native default in a row
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/c timeout 330 python3 bench/agent_bench.py starts --n 20 --deadline 325
    ;;
  starts)    # call 11: exec -> first token vs naive (cold_bench), then fresh starts in a row
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    sync
    OUT=$O/b timeout 100 python3 bench/cold_bench.py --quant none --timeout 80 > "$O/b/cold.out" 2>&1
    tail -c 1500 "$O/b/cold.out"
    OUT=$O/c timeout 380 python3 bench/agent_bench.py starts --n 20 --deadline 375
    ;;
  short)     # call 12: the second table, 64 short text chats, bf16 and fp8
    [ -f /tmp/glm9b/config.json ] || OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 95 python3 bench/agent_bench.py short --quant none --clients 64 --deadline 90
    OUT=$O/b timeout 110 python3 bench/agent_bench.py short --quant fp8 --clients 64 --deadline 105
    ;;
  final)     # the encoder-charged scheduler against call 7's bf16 numbers; exec -> first token vs naive; starts
    OUT=$O/a timeout 80 python3 bench/agent_bench.py build
    OUT=$O/a timeout 150 python3 bench/agent_bench.py agent --quant none --clients 1,8,32 --turns-s 20 --deadline 145
    OUT=$O/b timeout 100 python3 bench/cold_bench.py --quant none --timeout 80 > "$O/b/cold.out" 2>&1
    tail -c 2000 "$O/b/cold.out"
    OUT=$O/c timeout 60 python3 bench/fp8_bench.py check 55
    OUT=$O/c timeout 190 python3 bench/agent_bench.py starts --n 10 --deadline 185
    ls /opt/torch/.venv/lib/python3.12/site-packages/transformers/__pycache__ 2>&1 | head -3
    ;;
esac
rm -f "$O"/*/build.log "$O"/*/naive.log
for f in "$O"/*/*.log; do      # at most 8 files come back: server logs go into run.log's tail
  [ -f "$f" ] && { echo "== $f"; grep -E "graphs captured|engine ready|done after ready|fp8 conversion|fp8: device probes|fp8: kernels warmed|pre-quantized|Traceback|Error|error" "$f" | tail -40; rm -f "$f"; }
done
ls -R "$O"
