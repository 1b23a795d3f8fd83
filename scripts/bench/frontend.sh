#!/usr/bin/env bash
# Frontend CPU per streamed token and inter-token latency against the engine's own step
# times: `switchyard bench serve` against a spawned `switchyard serve` on the tiny synth
# model (one compute thread), at each concurrency, RUNS times, then one summary table.
#
#   scripts/bench/frontend.sh [OUT_DIR]      # env: RUNS (3), CONCURRENCY ("16 64"),
#                                            #      TOKENS (256), REQUESTS_PER_SLOT (2:
#                                            #      requests = 2 x concurrency), BIN,
#                                            #      MODEL, SERVE_ARGS, CLIENT_PREFIX,
#                                            #      PORT (18123)
#
# Each run's full report is OUT_DIR/c<C>-r<R>.json. Run it on an otherwise idle machine:
# the load generator shares it with the server, and CPU time per token moves with
# contention (the table shows the load average of each run).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-target/bench-frontend}
RUNS=${RUNS:-3}
CONCURRENCY=${CONCURRENCY:-"16 64"}
TOKENS=${TOKENS:-256}
BIN=${BIN:-target/release/switchyard}
MODEL=${MODEL:-target/bench-frontend/tiny}

if [ -z "${BIN_PREBUILT:-}" ]; then
    cargo build --release --locked -p switchyard
fi
mkdir -p "$OUT"
if [ ! -f "$MODEL/config.json" ]; then
    "$BIN" model synth --size tiny --out "$MODEL"
fi

PORT=${PORT:-18123}
for c in $CONCURRENCY; do
    for r in $(seq "$RUNS"); do
        # shellcheck disable=SC2086
        "$BIN" serve --model "$MODEL" --threads 1 --port "$PORT" ${SERVE_ARGS:-} \
            > "$OUT/server.log" 2>&1 &
        server=$!
        for _ in $(seq 300); do
            curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
            sleep 0.1
        done
        # CLIENT_PREFIX="chrt -b 0" runs the load generator as a batch task, so that its
        # wake-ups do not preempt the server mid-write as they do when it shares cores.
        ${CLIENT_PREFIX:-} "$BIN" bench serve --url "http://127.0.0.1:$PORT" --server-pid "$server" \
            --requests $((c * ${REQUESTS_PER_SLOT:-2})) --concurrency "$c" --prompt-tokens 128 \
            --max-tokens "$TOKENS" --json "$OUT/c$c-r$r.json" > /dev/null || status=$?
        kill "$server"
        wait "$server" || true
        [ -z "${status:-}" ] || exit "$status"
        echo "$(cut -d' ' -f1 /proc/loadavg)" > "$OUT/c$c-r$r.load"
    done
done

python3 - "$OUT" $CONCURRENCY <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| concurrency | run | load avg | frontend µs / token | engine step ms p50 / p90 / p99 "
      "| inter-token ms p50 / p90 / p99 | token wait engine→HTTP ms p50 / p99 / p99.9 | output tok/s |")
print("|---:|---:|---:|---:|---|---|---|---:|")
for c in sys.argv[2:]:
    for f in sorted(out.glob(f"c{c}-r*.json")):
        r = json.loads(f.read_text())
        load = f.with_suffix(".load").read_text().strip()
        cpu, st, itl = r["server_cpu"], r["engine_step_ms"], r["itl_ms"]
        d = r["token_delivery_ms"]
        print(f"| {c} | {f.stem.split('-r')[1]} | {load} | "
              f"{cpu['frontend_us_per_output_token']:.1f} | "
              f"{st['p50']:.2f} / {st['p90']:.2f} / {st['p99']:.2f} | "
              f"{itl['p50']:.2f} / {itl['p90']:.2f} / {itl['p99']:.2f} | "
              f"≤ {d['p50']:g} / ≤ {d['p99']:g} / ≤ {d['p999']:g} | "
              f"{r['output_tokens_per_s']:.0f} |")
PY
