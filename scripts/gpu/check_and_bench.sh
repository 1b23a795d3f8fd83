#!/usr/bin/env bash
# Checks and times the CUDA backend on the GPU machine. Builds nothing: it runs release
# binaries built on the development machine (see docs/gpu.md for the build commands).
#
#   scripts/gpu/check_and_bench.sh [BIN_DIR] [STAGES...]
#
# BIN_DIR holds `switchyard` and `cuda_check` (default gpu-bin). STAGES: check, synth,
# bench, eager (batch-1 decode with CUDA graphs off, for comparison), cublas (batch-1 decode
# with every matmul on cuBLAS, SWITCHYARD_CUDA_GEMV=0, for comparison), cli (`switchyard
# bench engine`), sampling (W1 greedy, then sampled with T 0.8, top_p 0.95 on the device
# and on the host), serve (`switchyard serve --device cuda` on the 8b model, loaded once,
# and `switchyard bench serve` at concurrency 1, 16 and 64: TTFT and inter-token p50/p99),
# profile (`switchyard bench profile` on the 8b model: measured step times as a mock-engine
# profile, $OUT/profile-h100-8b.json), nccl (`nccl_check`: an all-reduce over every GPU
# through NCCL, checked and timed; needs BIN_DIR/nccl_check and 2 GPUs or more), tp
# (`tp_check`: TP=$TP (default 2) against TP=1, greedy agreement, graphs against eager steps
# and decode throughput, on the small and 8b synth models; needs BIN_DIR/tp_check and that
# many GPUs; TP=1 runs the tensor-parallel path as a group of one on a single GPU, SHARED=1
# puts every rank on GPU 0), allreduce (`allreduce_check`: the all-reduce of our own and
# NCCL, exact sums checked and timed; on one GPU as ranks sharing it), clitp
# (`generate` and `bench engine` on the GPUs `--cuda-devices 0..TP-1` lists: the same greedy
# tokens as one GPU; TP defaults to 1 here), tp70b (a Llama-3-70B-shaped synth model,
# 141 GB of bf16, on the GPUs 0..TP-1, TP defaulting to 4: decode at batch 1 and 32 against
# the batch-1 bound `bench engine` prints; needs that many GPUs and ~150 GB of free disk),
# ncu64 (a batch-64 decode step of the 8b model kernel by kernel under Nsight Compute, and
# its wall time with graphs: where the step goes)
# (default: check synth bench eager cublas cli serve). Logs go to $OUT (or
# /tmp/switchyard-gpu); tables print last.
set -uo pipefail
BIN=${1:-gpu-bin}
shift || true
STAGES=${*:-check synth bench eager cublas cli serve}
LOG=${OUT:-/tmp/switchyard-gpu}
mkdir -p "$LOG"
M8B=${M8B:-/tmp/m8b}

# cudarc dlopen()s libcuda, libcublas(Lt) and libnvrtc: find the toolkit's and the
# Python wheels' lib folders at run time rather than hard-coding them.
libs=()
if command -v nvcc >/dev/null; then
    root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    for d in "$root/lib64" "$root/lib" "$root"/targets/*/lib; do [ -d "$d" ] && libs+=("$d"); done
fi
sp=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
for d in "$sp"/nvidia/*/lib; do [ -d "$d" ] && libs+=("$d"); done
# cudarc opens NCCL as libnccl.so; PyTorch's wheel ships only libnccl.so.2.
if [ -f "$sp/nvidia/nccl/lib/libnccl.so.2" ]; then
    mkdir -p /tmp/switchyard-nccl
    ln -sf "$sp/nvidia/nccl/lib/libnccl.so.2" /tmp/switchyard-nccl/libnccl.so
    libs+=(/tmp/switchyard-nccl)
fi
# NVLink multicast stays off: on shared hosts it can put the GPUs out of service.
export NCCL_NVLS_ENABLE=0
LD_LIBRARY_PATH=$(IFS=:; echo "${libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
export SWITCHYARD_CACHE_DIR=${SWITCHYARD_CACHE_DIR:-/tmp/switchyard-cache}

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$LOG/gpu.txt"
date -u | tee -a "$LOG/gpu.txt"
rc=0
for stage in $STAGES; do
    case $stage in
    check)
        "$BIN/cuda_check" check 2>&1 | tee "$LOG/check.log" || rc=1 ;;
    synth)
        [ -f "$M8B/config.json" ] || { time "$BIN/switchyard" model synth --size 8b --out "$M8B"; } 2>&1 | tail -3 ;;
    bench)
        "$BIN/cuda_check" bench "$M8B" 2>&1 | tee "$LOG/bench.log" || rc=1 ;;
    eager)
        SWITCHYARD_CUDA_GRAPHS=0 "$BIN/cuda_check" bench "$M8B" decode 2>&1 \
            | sed 's/^| decode batch 1/| decode batch 1, graphs off/' | tee "$LOG/bench_eager.log" || rc=1 ;;
    cublas)
        SWITCHYARD_CUDA_GEMV=0 "$BIN/cuda_check" bench "$M8B" decode 2>&1 \
            | sed 's/^| decode batch 1/| decode batch 1, all matmuls on cuBLAS/' | tee "$LOG/bench_cublas.log" || rc=1 ;;
    profile)
        "$BIN/switchyard" bench profile --device cuda --model "$M8B" \
            --out "$LOG/profile-h100-8b.json" 2>&1 | tee "$LOG/profile.log" || rc=1 ;;
    serve)
        port=${SERVE_PORT:-8123}
        "$BIN/switchyard" serve --model "$M8B" --device cuda --port "$port" \
            --served-model-name m8b >"$LOG/serve.log" 2>&1 &
        spid=$!
        # Ready when /health answers 200 (503 while the model loads); give up after 300 s.
        ready=0
        for _ in $(seq 600); do
            if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
                ready=1; break
            fi
            kill -0 "$spid" 2>/dev/null || break
            sleep 0.5
        done
        if [ $ready = 1 ]; then
            : >"$LOG/bench_serve.log"
            for c in 1 16 64; do
                reqs=$(( c == 1 ? 8 : 4 * c ))
                echo "| serve, concurrency $c, $reqs requests × 512 in / 128 out (ignore EOS) |" | tee -a "$LOG/bench_serve.log"
                "$BIN/switchyard" bench serve --url "http://127.0.0.1:$port" --server-pid "$spid" \
                    --concurrency "$c" --requests "$reqs" --prompt-tokens 512 --max-tokens 128 \
                    --json "$LOG/bench_serve_c$c.json" 2>&1 | tee -a "$LOG/bench_serve.log" || rc=1
            done
        else
            echo "serve: the server did not become ready" | tee -a "$LOG/bench_serve.log"; tail -20 "$LOG/serve.log"; rc=1
        fi
        kill -TERM "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
        tail -5 "$LOG/serve.log" ;;
    sampling)
        # W1 greedy, then sampled (T=0.8, top_p=0.95) on the device and on the host, one process.
        "$BIN/cuda_check" bench "$M8B" w1 w1s w1s-host 2>&1 | tee "$LOG/bench_sampling.log" || rc=1 ;;
    nccl)
        "$BIN/nccl_check" 2>&1 | tee "$LOG/nccl.log" || rc=1 ;;
    tp)
        # TP ${TP:-2} against TP 1: greedy agreement, then decode throughput at batch 1 and 64,
        # on the small synth model and on the 8b one.
        MSMALL=${MSMALL:-/tmp/msmall}
        [ -f "$MSMALL/config.json" ] || "$BIN/switchyard" model synth --size small --out "$MSMALL" >/dev/null
        # SHARED=1: every rank on GPU 0 (tp_check --shared-gpu), for a single-GPU machine.
        for m in "$MSMALL" "$M8B"; do
            echo "== $m" | tee -a "$LOG/tp.log"
            "$BIN/tp_check" "$m" "${TP:-2}" 1 64 ${SHARED:+--shared-gpu} 2>&1 | tee -a "$LOG/tp.log" || rc=1
        done ;;
    allreduce)
        # The all-reduce of our own against NCCL, checked (exact sums, the same bits on
        # every rank) and timed: over every GPU when there are two or more, else as one
        # rank and as 2 and 4 ranks sharing GPU 0.
        n=$(nvidia-smi -L | wc -l)
        if [ "$n" -ge 2 ]; then
            "$BIN/allreduce_check" 2>&1 | tee "$LOG/allreduce.log" || rc=1
        else
            for a in "--one" "--shared-gpu 2" "--shared-gpu 4"; do
                # shellcheck disable=SC2086
                "$BIN/allreduce_check" $a 2>&1 | tee -a "$LOG/allreduce.log" || rc=1
            done
        fi ;;
    clitp)
        # The CLI's GPU selection on the small synth model: `generate` on the GPUs that
        # --cuda-devices lists against one GPU (TP ${TP:-1}; with TP 1 the same GPU must
        # give the same tokens, with more ranks bf16 partial sums may part them after a
        # while: the agreeing prefix is printed), then `bench engine` on the same GPUs.
        MSMALL=${MSMALL:-/tmp/msmall}
        [ -f "$MSMALL/config.json" ] || "$BIN/switchyard" model synth --size small --out "$MSMALL" >/dev/null
        devs=$(seq -s, 0 $((${TP:-1} - 1)))
        gen() { "$BIN/switchyard" generate --device cuda --model "$MSMALL" --prompt "the quick brown fox" \
            --max-tokens 32 --ignore-eos --json "$@"; }
        gen --cuda-device 0 > "$LOG/clitp-1.json" && gen --cuda-devices "$devs" > "$LOG/clitp-n.json" || rc=1
        python3 - "$LOG" "$devs" <<'PY' 2>&1 | tee "$LOG/clitp.log" || rc=1
import json, sys
log, devs = sys.argv[1], sys.argv[2]
one = json.load(open(f"{log}/clitp-1.json"))["output_ids"]
many = json.load(open(f"{log}/clitp-n.json"))["output_ids"]
same = next((i for i, (a, b) in enumerate(zip(one, many)) if a != b), min(len(one), len(many)))
print(f"| clitp | --cuda-devices {devs} | greedy tokens agreeing with one GPU: {same} of {len(one)} |")
sys.exit(1 if "," not in devs and same != len(one) else 0)
PY
        "$BIN/switchyard" bench engine --device cuda --cuda-devices "$devs" --model "$MSMALL" --batch 1,32 \
            --json "$LOG/clitp-bench.json" 2>&1 | tee -a "$LOG/clitp.log" || rc=1 ;;
    tp70b)
        M70B=${M70B:-/tmp/m70b}
        [ -f "$M70B/config.json" ] || "$BIN/switchyard" model synth --size 70b --out "$M70B" >/dev/null
        devs=$(seq -s, 0 $((${TP:-4} - 1)))
        "$BIN/switchyard" bench engine --device cuda --cuda-devices "$devs" --model "$M70B" \
            --batch 1,32 --prompt-len 512 --decode-tokens 64 --prefill-prompts 4 --prefill-len 2048 \
            --json "$LOG/tp70b.json" 2>&1 | tee "$LOG/tp70b.log" || rc=1 ;;
    ncu64)
        # Where a batch-64 decode step of the 8b model goes, kernel by kernel: `bench engine`
        # eagerly (graphs off, so each kernel is its own launch) under Nsight Compute with
        # the clocks and caches left alone; steps are cut at each greedy argmax, and those
        # that decode 64 sequences (decode attention, no prefill attention, 64 rows
        # embedded) are averaged by kernel. Then the same step with graphs on, timed by
        # `bench engine` alone, for the host's share.
        NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        SWITCHYARD_CUDA_GRAPHS=0 "$NCU" --csv --print-units base --clock-control none \
            --cache-control none --metrics gpu__time_duration.sum \
            "$BIN/switchyard" bench engine --device cuda --model "$M8B" --batch 64 --prompt-len 128 \
            --decode-tokens 6 --prefill-prompts 1 --prefill-len 128 > "$LOG/ncu64.csv" 2> "$LOG/ncu64.err" || rc=1
        python3 - "$LOG/ncu64.csv" <<'PY' 2>&1 | tee "$LOG/ncu64.log" || rc=1
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; k, v = head.index("Kernel Name"), head.index("Metric Value")
num = lambda x: x.replace(",", "")
g = head.index("Grid Size")
kernels = [(r[k], float(num(r[v])), r[g]) for r in rows[1:] if num(r[v]).replace(".", "", 1).isdigit()]
steps, cur = [], []
for name, ns, grid in kernels:
    cur.append((name, ns, grid))
    if name.startswith("argmax_rows"):
        steps.append(cur); cur = []
def decode64(st):
    names = [n for n, _, _ in st]
    return (any(n.startswith("decode_attn") for n in names)
            and not any(n.startswith("prefill_attn") for n in names)
            and any(n == "embed" and gr == "(64, 1, 1)" for n, _, gr in st))
last = [st for st in steps if decode64(st)]
if not last:
    sys.exit("no batch-64 decode step found")
per = collections.defaultdict(lambda: [0, 0.0])
for st in last:
    for name, ns, _ in st:
        short = name.split("(")[0][:70]
        per[short][0] += 1; per[short][1] += ns
total = sum(ns for st in last for _, ns, _ in st) / len(last)
print(f"steps found {len(steps)}; {len(last)} decode at batch 64, averaged; kernels per step {len(last[0])}; GPU time per step {total/1e3:.1f} us")
print("| kernel | launches / step | us / step | share |")
print("|---|---:|---:|---:|")
for name, (n, ns) in sorted(per.items(), key=lambda x: -x[1][1]):
    print(f"| {name} | {n/len(last):.0f} | {ns/len(last)/1e3:.1f} | {ns/len(last)/total:.1%} |")
PY
        "$BIN/switchyard" bench engine --device cuda --model "$M8B" --batch 1,64 --prompt-len 128 \
            --decode-tokens 64 --prefill-prompts 1 --prefill-len 128 2>&1 | tee -a "$LOG/ncu64.log" || rc=1 ;;
    cli)
        "$BIN/switchyard" bench engine --device cuda --model "$M8B" --batch 1,32,256 \
            --prompt-len 512 --decode-tokens 64 --prefill-prompts 8 --prefill-len 2048 \
            --json "$LOG/bench_engine.json" 2>&1 | tee "$LOG/bench_engine.log" || rc=1 ;;
    esac
done
echo "== summary =="
grep -h '^|' "$LOG/check.log" "$LOG/bench.log" "$LOG/bench_eager.log" "$LOG/bench_cublas.log" "$LOG/bench_sampling.log" \
    "$LOG/bench_engine.log" "$LOG/bench_serve.log" "$LOG/nccl.log" "$LOG/tp.log" "$LOG/clitp.log" \
    "$LOG/tp70b.log" 2>/dev/null
exit $rc
