// Switchyard CUDA kernels, compiled at run time by NVRTC (see backend/cuda/module.rs).
//
// bf16 values travel as `unsigned short` bit patterns and are widened/narrowed by hand, so
// the source needs no CUDA headers and NVRTC needs no include path. All arithmetic is f32.
// The KV cache layout matches the CPU backend: per layer `[block][kv_head][offset][head_dim]`.

typedef unsigned short bf16;
typedef unsigned int u32;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even, as the CPU backend's `half::bf16::from_f32` does.
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Two floats to a bf16 pair, `lo` in the low half (lower address).
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : 0.f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------------------------------
// Row-wise kernels. `cols` is a multiple of 8 for every vectorised kernel (checked on host).

extern "C" __global__ void embed(const bf16* table, const u32* ids, bf16* out, int cols) {
    const uint4* src = (const uint4*)(table + (size_t)ids[blockIdx.x] * cols);
    uint4* dst = (uint4*)(out + (size_t)blockIdx.x * cols);
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void gather_rows(const bf16* x, const u32* rows, bf16* out, int cols) {
    const uint4* src = (const uint4*)(x + (size_t)rows[blockIdx.x] * cols);
    uint4* dst = (uint4*)(out + (size_t)blockIdx.x * cols);
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void rms_norm(const bf16* x, const float* w, bf16* out, int cols,
                                    float eps) {
    const uint4* xr = (const uint4*)(x + (size_t)blockIdx.x * cols);
    uint4* o = (uint4*)(out + (size_t)blockIdx.x * cols);
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
        float f[8];
        unpack8(xr[i], f);
#pragma unroll
        for (int e = 0; e < 8; e++) ss += f[e] * f[e];
    }
    float scale = rsqrtf(block_sum(ss) / cols + eps);
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
        float f[8];
        unpack8(xr[i], f);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = w[i * 8 + e] * (f[e] * scale);
        o[i] = pack8(f);
    }
}

// residual += delta (rounded to bf16, as the stored residual is); out = rms_norm(residual).
extern "C" __global__ void add_rms_norm(bf16* residual, const bf16* delta, const float* w,
                                        bf16* out, int cols, float eps) {
    uint4* r = (uint4*)(residual + (size_t)blockIdx.x * cols);
    const uint4* d = (const uint4*)(delta + (size_t)blockIdx.x * cols);
    uint4* o = (uint4*)(out + (size_t)blockIdx.x * cols);
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
        float a[8], b[8];
        unpack8(r[i], a);
        unpack8(d[i], b);
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] = a[e] + b[e];
        uint4 s = pack8(a);
        r[i] = s;
        unpack8(s, a);
#pragma unroll
        for (int e = 0; e < 8; e++) ss += a[e] * a[e];
    }
    float scale = rsqrtf(block_sum(ss) / cols + eps);
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
        float f[8];
        unpack8(r[i], f);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = w[i * 8 + e] * (f[e] * scale);
        o[i] = pack8(f);
    }
}

extern "C" __global__ void add_assign(bf16* x, const bf16* d, long long n8) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float a[8], b[8];
    unpack8(((uint4*)x)[i], a);
    unpack8(((const uint4*)d)[i], b);
#pragma unroll
    for (int e = 0; e < 8; e++) a[e] += b[e];
    ((uint4*)x)[i] = pack8(a);
}

extern "C" __global__ void add_bias(bf16* x, const float* bias, int cols) {
    bf16* row = x + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = f2bf(bf2f(row[c]) + bias[c]);
}

// out[r] = silu(gate[r]) * up[r] for rows laid out [gate | up].
extern "C" __global__ void silu_mul(const bf16* gate_up, bf16* out, int inter) {
    const uint4* g = (const uint4*)(gate_up + (size_t)blockIdx.y * 2 * inter);
    const uint4* u = (const uint4*)(gate_up + (size_t)blockIdx.y * 2 * inter + inter);
    uint4* o = (uint4*)(out + (size_t)blockIdx.y * inter);
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= inter / 8) return;
    float a[8], b[8];
    unpack8(g[i], a);
    unpack8(u[i], b);
#pragma unroll
    for (int e = 0; e < 8; e++) a[e] = a[e] / (1.f + __expf(-a[e])) * b[e];
    o[i] = pack8(a);
}

// One warp per (row, head) of q and k: optional per-head RMSNorm (Qwen3), then RoPE with
// the "rotate_half" pairing (i, i + d/2). The angle is rounded to f32 before cos/sin, as the
// reference does; cos/sin themselves run in double so long positions stay exact.
extern "C" __global__ void qk_norm_rope(bf16* qkv, int qkv_cols, int nq, int nk, int hd,
                                        const u32* positions, const float* inv_freq,
                                        const float* qw, const float* kw, float eps) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int head = blockIdx.y * (blockDim.x >> 5) + warp;
    if (head >= nq + nk) return;
    int t = blockIdx.x;
    bf16* h = qkv + (size_t)t * qkv_cols + head * hd;
    int half = hd / 2;
    float pos = (float)positions[t];
    float scale = 1.f;
    const float* w = head < nq ? qw : kw;
    if (w) {
        float ss = 0.f;
        for (int i = lane; i < hd; i += 32) {
            float v = bf2f(h[i]);
            ss += v * v;
        }
        scale = rsqrtf(warp_sum(ss) / hd + eps);
    }
    for (int i = lane; i < half; i += 32) {
        float x1 = bf2f(h[i]), x2 = bf2f(h[i + half]);
        if (w) {
            x1 = w[i] * (x1 * scale);
            x2 = w[i + half] * (x2 * scale);
        }
        float angle = __fmul_rn(pos, inv_freq[i]);
        double s, c;
        sincos((double)angle, &s, &c);
        float cf = (float)c, sf = (float)s;
        h[i] = f2bf(x1 * cf - x2 * sf);
        h[i + half] = f2bf(x2 * cf + x1 * sf);
    }
}

// Writes each row's k and v heads into its KV slot. kc/vc point at this layer's cache.
extern "C" __global__ void write_kv(const bf16* qkv, int qkv_cols, int q_size, int nkv, int hd,
                                    const u32* slots, bf16* kc, bf16* vc, int bs) {
    int t = blockIdx.x;
    u32 slot = slots[t];
    if (slot == 0xffffffffu) return;  // a padding row of a graphed decode step
    size_t blk = slot / bs, off = slot % bs;
    int kv_size = nkv * hd;
    const bf16* row = qkv + (size_t)t * qkv_cols + q_size;
    for (int i = threadIdx.x; i < kv_size / 8; i += blockDim.x) {
        int h = (i * 8) / hd, d = (i * 8) % hd;
        size_t dst = ((blk * nkv + h) * bs + off) * hd + d;
        *(uint4*)(kc + dst) = *(const uint4*)(row + i * 8);
        *(uint4*)(vc + dst) = *(const uint4*)(row + kv_size + i * 8);
    }
}

// Index of the first maximum of each row (ties go to the lowest id, as the CPU sampler).
extern "C" __global__ void argmax_rows(const bf16* x, int cols, u32* out) {
    const bf16* row = x + (size_t)blockIdx.x * cols;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = bf2f(row[c]);
        if (v > best) { best = v; idx = c; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float b2 = __shfl_xor_sync(0xffffffffu, best, o);
        int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
        if (b2 > best || (b2 == best && i2 < idx)) { best = b2; idx = i2; }
    }
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sb[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (sb[w] > best || (sb[w] == best && si[w] < idx)) { best = sb[w]; idx = si[w]; }
        out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

extern "C" __global__ void bf16_to_f32(const bf16* x, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf2f(x[i]);
}

// ---------------------------------------------------------------------------------------
// Paged decode attention (one query row per sequence). A block serves one (sequence,
// kv head, context split) and every query head of that kv head's group, so each K/V byte
// is read once per group. Within a warp, HD/8 lanes share a token (16-byte loads), so a
// warp works on 32/(HD/8) tokens at a time, each keeping its own online softmax; the
// workers are merged through shared memory at the end. Long contexts are split across
// blocks (`part` tokens each) and merged by `decode_reduce`.
//
// seqinfo: 4 u32 per decode sequence: q_row, unused, ctx_len, block-table offset.

#define DEC_WARPS 4

// `part == 0` (graphed decode steps, whose kernel arguments are fixed) means: split this
// sequence's own context over the `max_splits` blocks, in multiples of 32 tokens. Eager
// steps pass one `part` for the whole step, computed on the host.
__device__ __forceinline__ int split_part(int ctx, int max_splits) {
    int p = (ctx + max_splits - 1) / max_splits;
    return max(32, (p + 31) / 32 * 32);
}

template <int HD, int G>
__device__ void decode_attn(const bf16* qkv, int qkv_cols, bf16* out, int out_cols,
                            const bf16* kc, const bf16* vc, const u32* seqinfo, const u32* bts,
                            int nkv, int bs, float scale, int part, float* part_acc,
                            float* part_ml, int max_splits) {
    constexpr int LPT = HD / 8;
    constexpr int TPW = 32 / LPT;
    constexpr int NWK = DEC_WARPS * TPW;
    __shared__ float sm_acc[NWK][G][HD];
    __shared__ float sm_m[NWK][G];
    __shared__ float sm_l[NWK][G];

    int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const u32* si = seqinfo + 4 * s;
    int row = si[0], ctx = si[2];
    const u32* bt = bts + si[3];
    if (ctx == 0) {
        // A padding row of a graphed decode step: keep its output finite.
        if (split == 0)
            for (int i = threadIdx.x; i < G * HD; i += blockDim.x)
                out[(size_t)row * out_cols + kvh * G * HD + i] = 0;
        return;
    }
    if (part == 0) part = split_part(ctx, max_splits);
    int nsplit = (ctx + part - 1) / part;
    if (split >= nsplit) return;
    int t0 = split * part, t1 = min(ctx, t0 + part);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int sub = lane / LPT, l = lane % LPT;
    int nq = nkv * G;

    float q[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        uint4 v = *(const uint4*)(qkv + (size_t)row * qkv_cols + (kvh * G + g) * HD + l * 8);
        unpack8(v, q[g]);
#pragma unroll
        for (int e = 0; e < 8; e++) q[g][e] *= scale;
    }
    float m[G], lsum[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        lsum[g] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.f;
    }
    for (int tb = t0 + warp * TPW; tb < t1; tb += DEC_WARPS * TPW) {
        int t = tb + sub;
        bool valid = t < t1;
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
        if (valid) {
            size_t blk = bt[t / bs];
            size_t base = ((blk * nkv + kvh) * bs + (t % bs)) * HD + l * 8;
            kv = *(const uint4*)(kc + base);
            vv = *(const uint4*)(vc + base);
        }
        float k[8], v[8];
        unpack8(kv, k);
        unpack8(vv, v);
#pragma unroll
        for (int g = 0; g < G; g++) {
            float d = 0.f;
#pragma unroll
            for (int e = 0; e < 8; e++) d += q[g][e] * k[e];
#pragma unroll
            for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            if (valid) {
                float mn = fmaxf(m[g], d);
                float corr = __expf(m[g] - mn);
                float p = __expf(d - mn);
                lsum[g] = lsum[g] * corr + p;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] = acc[g][e] * corr + p * v[e];
                m[g] = mn;
            }
        }
    }
    int wk = warp * TPW + sub;
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int e = 0; e < 8; e++) sm_acc[wk][g][l * 8 + e] = acc[g][e];
        if (l == 0) {
            sm_m[wk][g] = m[g];
            sm_l[wk][g] = lsum[g];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        int g = i / HD, d = i % HD;
        float M = NEG_INF;
        for (int w = 0; w < NWK; w++) M = fmaxf(M, sm_m[w][g]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < NWK; w++) {
            float mw = sm_m[w][g];
            float f = mw == NEG_INF ? 0.f : __expf(mw - M);
            L += sm_l[w][g] * f;
            A += sm_acc[w][g][d] * f;
        }
        int head = kvh * G + g;
        if (nsplit == 1) {
            out[(size_t)row * out_cols + head * HD + d] = f2bf(A / L);
        } else {
            size_t p = ((size_t)s * nq + head) * max_splits + split;
            part_acc[p * HD + d] = A;
            if (d == 0) {
                part_ml[2 * p] = M;
                part_ml[2 * p + 1] = L;
            }
        }
    }
}

extern "C" __global__ void decode_reduce(bf16* out, int out_cols, const u32* seqinfo, int nq,
                                         int hd, int part, const float* part_acc,
                                         const float* part_ml, int max_splits) {
    int s = blockIdx.x, head = blockIdx.y;
    const u32* si = seqinfo + 4 * s;
    int row = si[0], ctx = si[2];
    if (ctx == 0) return;
    if (part == 0) part = split_part(ctx, max_splits);
    int nsplit = (ctx + part - 1) / part;
    if (nsplit <= 1) return;
    size_t p0 = ((size_t)s * nq + head) * max_splits;
    float M = NEG_INF;
    for (int i = 0; i < nsplit; i++) M = fmaxf(M, part_ml[2 * (p0 + i)]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float L = 0.f, A = 0.f;
        for (int i = 0; i < nsplit; i++) {
            float f = __expf(part_ml[2 * (p0 + i)] - M);
            L += part_ml[2 * (p0 + i) + 1] * f;
            A += part_acc[(p0 + i) * hd + d] * f;
        }
        out[(size_t)row * out_cols + head * hd + d] = f2bf(A / L);
    }
}

// ---------------------------------------------------------------------------------------
// Causal prefill attention over variable-length sequences, reading every key and value
// (cached prefix and this step's rows alike) from the paged cache: a prefix-cache hit is
// just a longer context. Flash-attention-2 shape on the tensor cores (mma.sync m16n8k16,
// bf16 in, f32 accumulate): a block owns 64 query rows of one head (16 per warp) and walks
// the keys in tiles of 64 staged through shared memory, V stored transposed so that its
// B fragments are single 32-bit loads.
//
// tiles: 2 u32 per block: sequence index, first query row. seqinfo: 4 u32 per sequence:
// q_start, q_len, ctx_len, block-table offset.

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD>
__device__ void prefill_attn(const bf16* qkv, int qkv_cols, bf16* out, int out_cols,
                             const bf16* kc, const bf16* vc, const u32* seqinfo,
                             const u32* tiles, const u32* bts, int nq, int nkv, int bs,
                             float scale_log2) {
    constexpr int BM = 64, BN = 64;
    constexpr int KSTR = HD + 8;  // padding spreads rows over banks
    constexpr int VSTR = BN + 8;
    __shared__ __align__(16) bf16 Ks[BN * KSTR];
    __shared__ __align__(16) bf16 Vt[HD * VSTR];

    int seq = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
    int head = blockIdx.y, kvh = head / (nq / nkv);
    const u32* si = seqinfo + 4 * seq;
    int q_start = si[0], q_len = si[1], ctx = si[2];
    const u32* bt = bts + si[3];
    int prefix = ctx - q_len;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int gid = lane >> 2, tig = lane & 3;
    int ra = q0 + warp * 16 + gid, rb = ra + 8;

    u32 qf[HD / 16][4];
    {
        const bf16* qa = qkv + (size_t)(q_start + min(ra, q_len - 1)) * qkv_cols + head * HD;
        const bf16* qb = qkv + (size_t)(q_start + min(rb, q_len - 1)) * qkv_cols + head * HD;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            int c = kk * 16 + tig * 2;
            qf[kk][0] = *(const u32*)(qa + c);
            qf[kk][1] = *(const u32*)(qb + c);
            qf[kk][2] = *(const u32*)(qa + c + 8);
            qf[kk][3] = *(const u32*)(qb + c + 8);
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};

    int kend = prefix + min(q0 + BM, q_len);
    for (int kb = 0; kb < kend; kb += BN) {
        __syncthreads();
        for (int i = tid; i < BN * HD / 8; i += blockDim.x) {
            int key = i % BN, c8 = (i / BN) * 8;
            int j = kb + key;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < kend) {
                size_t blk = bt[j / bs];
                size_t base = ((blk * nkv + kvh) * bs + (j % bs)) * HD + c8;
                kv = *(const uint4*)(kc + base);
                vv = *(const uint4*)(vc + base);
            }
            *(uint4*)(Ks + key * KSTR + c8) = kv;
            const bf16* ve = (const bf16*)&vv;
#pragma unroll
            for (int e = 0; e < 8; e++) Vt[(c8 + e) * VSTR + key] = ve[e];
        }
        __syncthreads();

        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const bf16* kr = Ks + (nt * 8 + gid) * KSTR + tig * 2;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++)
                mma16816(s[nt], qf[kk], *(const u32*)(kr + kk * 16),
                         *(const u32*)(kr + kk * 16 + 8));
        }
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = e < 2 ? ra : rb;
                int key = kb + nt * 8 + tig * 2 + (e & 1);
                float v = key <= prefix + r ? s[nt][e] * scale_log2 : NEG_INF;
                s[nt][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float mn = fmaxf(mrow[r], mx[r]);
            corr[r] = mn == NEG_INF ? 1.f : exp2f(mrow[r] - mn);
            mrow[r] = mn;
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float m = mrow[e >> 1];
                float p = m == NEG_INF ? 0.f : exp2f(s[nt][e] - m);
                s[nt][e] = p;
                rs[e >> 1] += p;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * corr[r] + rs[r];
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            o[i][0] *= corr[0];
            o[i][1] *= corr[0];
            o[i][2] *= corr[1];
            o[i][3] *= corr[1];
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 a[4];
            a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt++) {
                const bf16* vr = Vt + (nt * 8 + gid) * VSTR + kk * 16 + tig * 2;
                mma16816(o[nt], a, *(const u32*)vr, *(const u32*)(vr + 8));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
    float ia = 1.f / lrow[0], ib = 1.f / lrow[1];
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++) {
        int d = head * HD + nt * 8 + tig * 2;
        if (ra < q_len)
            *(u32*)(out + (size_t)(q_start + ra) * out_cols + d) = pack2(o[nt][0] * ia, o[nt][1] * ia);
        if (rb < q_len)
            *(u32*)(out + (size_t)(q_start + rb) * out_cols + d) = pack2(o[nt][2] * ib, o[nt][3] * ib);
    }
}

#define DECODE(HD, G)                                                                          \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) decode_attn_##HD##_##G(      \
        const bf16* qkv, int qkv_cols, bf16* out, int out_cols, const bf16* kc,               \
        const bf16* vc, const u32* seqinfo, const u32* bts, int nkv, int bs, float scale,     \
        int part, float* part_acc, float* part_ml, int max_splits) {                          \
        decode_attn<HD, G>(qkv, qkv_cols, out, out_cols, kc, vc, seqinfo, bts, nkv, bs, scale, \
                           part, part_acc, part_ml, max_splits);                              \
    }
#define DECODE_ALL_G(HD) DECODE(HD, 1) DECODE(HD, 2) DECODE(HD, 4) DECODE(HD, 8)
DECODE_ALL_G(16)
DECODE_ALL_G(32)
DECODE_ALL_G(64)
DECODE_ALL_G(128)

#define PREFILL(HD)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) prefill_attn_##HD(                      \
        const bf16* qkv, int qkv_cols, bf16* out, int out_cols, const bf16* kc,               \
        const bf16* vc, const u32* seqinfo, const u32* tiles, const u32* bts, int nq,         \
        int nkv, int bs, float scale_log2) {                                                  \
        prefill_attn<HD>(qkv, qkv_cols, out, out_cols, kc, vc, seqinfo, tiles, bts, nq, nkv,  \
                         bs, scale_log2);                                                     \
    }
PREFILL(16)
PREFILL(32)
PREFILL(64)
PREFILL(128)

// ---------------------------------------------------------------------------------------
// Skinny GEMM for M <= 8 rows (decode): out[m, n] = sum_k x[m, k] * w[n, k].
// Weight-bandwidth bound: each warp owns NR consecutive output columns and streams those
// weight rows once with 16-byte non-allocating loads (8 in flight per lane); the M
// activation rows are small and re-read through L1, once per NR columns. f32 accumulation.
// Every output is summed in the same order (each lane's chunks c = lane + 32 i in rising i,
// then a butterfly over the warp) whatever M and NR are, so a sequence's result does not
// depend on its batch. `k` is a multiple of 8 (checked on host).

#define GEMV_WARPS 4
#define GEMV_LOADS 8

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <int M, int NR>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          bf16* __restrict__ out, int n, int k) {
    constexpr int U = GEMV_LOADS / NR;
    int lane = threadIdx.x & 31;
    int col0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * NR;
    if (col0 >= n) return;
    int k8 = k >> 3;
    const uint4* wr[NR];
    bool live[NR];
#pragma unroll
    for (int j = 0; j < NR; j++) {
        live[j] = col0 + j < n;
        wr[j] = (const uint4*)(w + (size_t)(live[j] ? col0 + j : col0) * k);
    }
    float acc[M][NR];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int j = 0; j < NR; j++) acc[m][j] = 0.f;
    for (int base = lane; base < k8; base += 32 * U) {
        uint4 wv[U][NR];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = base + 32 * u;
#pragma unroll
            for (int j = 0; j < NR; j++)
                wv[u][j] = (c < k8 && live[j]) ? ld_stream(wr[j] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = base + 32 * u;
            if (c < k8) {
                float wf[NR][8];
#pragma unroll
                for (int j = 0; j < NR; j++) unpack8(wv[u][j], wf[j]);
#pragma unroll
                for (int m = 0; m < M; m++) {
                    float xf[8];
                    unpack8(__ldg((const uint4*)(x + (size_t)m * k) + c), xf);
#pragma unroll
                    for (int j = 0; j < NR; j++) {
                        float d = 0.f;
#pragma unroll
                        for (int i = 0; i < 8; i++) d = fmaf(wf[j][i], xf[i], d);
                        acc[m][j] += d;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int j = 0; j < NR; j++) {
            float s = warp_sum(acc[m][j]);
            if (lane == 0 && live[j]) out[(size_t)m * n + col0 + j] = f2bf(s);
        }
}

// gemv_M serves M rows with GEMV_NR(M) columns per warp (kept in step with the host's
// `gemv_cols_per_warp`).
#define GEMV(M, NR)                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                             \
        gemv_##M(const bf16* x, const bf16* w, bf16* out, int n, int k) {                     \
        gemv_body<M, NR>(x, w, out, n, k);                                                    \
    }
GEMV(1, 1)
GEMV(2, 2)
GEMV(3, 2)
GEMV(4, 4)
GEMV(5, 4)
GEMV(6, 4)
GEMV(7, 4)
GEMV(8, 4)

// ---------------------------------------------------------------------------------------
// Sampling on the device: one block (1024 threads) per logit row. Logits are bf16, so every
// threshold is one of 65536 order keys and is found exactly by a 16-step bisection over
// keys, each step one block-wide count or mass reduction over the row (no sort). The CPU
// sampler's semantics: NaN impossible, +inf the largest finite value; top_k keeps tokens at
// or above the k-th largest logit (ties included); weights exp((x - max) / T) (the most
// likely token weighs 1) below min_p are dropped; the nucleus keeps the tokens whose more
// likely tokens weigh less than top_p of what is left; then inverse CDF over token ids with
// the row's uniform. T < 1e-5 or top_k == 1: the first maximum.
//
// Row r's logits start at r * stride (stride 0: every row samples the same logits, for
// checks). params: 5 words per row: temperature, top_p, min_p, uniform (f32 bits), top_k (u32).

// Order key of a (sanitised) bf16 value: monotone in the value.
__device__ __forceinline__ u32 bf_key(bf16 b) {
    if ((b & 0x7fffu) > 0x7f80u) b = 0xff80u;          // NaN -> -inf
    else if (b == 0x7f80u) b = 0x7f7fu;                // +inf -> largest finite
    else if (b == 0x8000u) b = 0u;                     // -0 -> +0
    return (b & 0x8000u) ? (~(u32)b & 0xffffu) : ((u32)b | 0x8000u);
}

__device__ __forceinline__ float key_val(u32 k) {
    u32 b = (k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu);
    return bf2f((bf16)b);
}

#define KEY_NEG_INF 0x007fu  // bf_key(0xff80)

__device__ __forceinline__ float key_weight(u32 k, float m, float inv_t) {
    return k <= KEY_NEG_INF ? 0.f : __expf((key_val(k) - m) * inv_t);
}

__device__ u32 block_max_u32(u32 v) {
    __shared__ u32 part[32];
    __shared__ u32 total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        u32 s = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : 0u;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s = max(s, __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) total = s;
    }
    __syncthreads();
    u32 r = total;
    __syncthreads();
    return r;
}

__device__ u32 block_min_u32(u32 v) { return ~block_max_u32(~v); }

// Exclusive prefix sum over the block's threads (in thread order); `total` gets the sum.
__device__ float block_exclusive_scan(float v, float* total) {
    __shared__ float part[32];
    __shared__ float tot;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) part[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        float s = lane < nw ? part[lane] : 0.f;
        float t = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        part[lane] = t - s;  // exclusive offset of each warp
        if (lane == 31) tot = t;
    }
    __syncthreads();
    float r = part[warp] + x - v;
    *total = tot;
    __syncthreads();
    return r;
}

extern "C" __global__ void __launch_bounds__(1024) sample_rows(
    const bf16* logits, int cols, long long stride, const u32* params, u32* out) {
    const bf16* row = logits + (size_t)blockIdx.x * stride;
    const u32* pr = params + 5 * blockIdx.x;
    float temp = __uint_as_float(pr[0]), top_p = __uint_as_float(pr[1]);
    float min_p = __uint_as_float(pr[2]), u = __uint_as_float(pr[3]);
    u32 top_k = pr[4];

    // Largest key.
    u32 kmax = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) kmax = max(kmax, bf_key(row[c]));
    kmax = block_max_u32(kmax);
    if (kmax <= KEY_NEG_INF) {  // no possible token
        if (threadIdx.x == 0) out[blockIdx.x] = 0;
        return;
    }
    if (!(temp >= 1e-5f) || top_k == 1) {  // greedy: the first maximum
        u32 first = 0xffffffffu;
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            if (bf_key(row[c]) == kmax) { first = c; break; }
        first = block_min_u32(first);
        if (threadIdx.x == 0) out[blockIdx.x] = first;
        return;
    }
    float m = key_val(kmax), inv_t = 1.f / temp;

    // top_k: the largest key t with count(key >= t) >= k.
    u32 lo = 0;
    if (top_k > 0 && top_k < (u32)cols) {
        u32 hi = 0x10000u;
        while (hi - lo > 1) {
            u32 mid = (lo + hi) >> 1;
            float n = 0.f;
            for (int c = threadIdx.x; c < cols; c += blockDim.x) n += bf_key(row[c]) >= mid ? 1.f : 0.f;
            n = block_sum(n);
            if (n >= (float)top_k) lo = mid; else hi = mid;
        }
    }
    // min_p works on weights, which are monotone in the key: fold it into the threshold
    // as a weight test below (exact, as on the host).
    // top_p: the largest key t >= lo with mass(key >= t, kept) >= top_p * mass(kept).
    if (top_p < 1.f) {
        float z = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            u32 k = bf_key(row[c]);
            float w = key_weight(k, m, inv_t);
            z += (k >= lo && w >= min_p) ? w : 0.f;
        }
        z = block_sum(z);
        float need = top_p * z;
        u32 hi = 0x10000u;
        while (hi - lo > 1) {
            u32 mid = (lo + hi) >> 1;
            float s = 0.f;
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                u32 k = bf_key(row[c]);
                float w = key_weight(k, m, inv_t);
                s += (k >= mid && w >= min_p) ? w : 0.f;
            }
            s = block_sum(s);
            if (s >= need) lo = mid; else hi = mid;
        }
    }

    // Inverse CDF over token ids: each thread owns a contiguous run of ids.
    int per = (cols + blockDim.x - 1) / blockDim.x;
    int c0 = min(cols, (int)threadIdx.x * per), c1 = min(cols, c0 + per);
    float mine = 0.f;
    int last_kept = -1;
    for (int c = c0; c < c1; c++) {
        u32 k = bf_key(row[c]);
        float w = key_weight(k, m, inv_t);
        if (k >= lo && w >= min_p && w > 0.f) { mine += w; last_kept = c; }
    }
    float total;
    float off = block_exclusive_scan(mine, &total);
    float target = u * total;
    // The last thread holding any weight takes targets past the end (rounding).
    u32 last_owner = block_max_u32(last_kept >= 0 ? threadIdx.x + 1 : 0u);
    __shared__ u32 chosen;
    if (threadIdx.x == 0) chosen = 0xffffffffu;
    __syncthreads();
    bool owner = last_kept >= 0 && off <= target &&
                 (target < off + mine || threadIdx.x + 1 == last_owner);
    if (owner) {
        float acc = off;
        int pick = last_kept;
        for (int c = c0; c < c1; c++) {
            u32 k = bf_key(row[c]);
            float w = key_weight(k, m, inv_t);
            if (k >= lo && w >= min_p && w > 0.f) {
                acc += w;
                if (acc > target) { pick = c; break; }
            }
        }
        atomicMin(&chosen, (u32)pick);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 id = chosen;
        out[blockIdx.x] = id == 0xffffffffu ? 0u : id;  // unreachable: the set is non-empty
    }
}

// ---------------------------------------------------------------------------------------
// All-reduce of our own for the ranks of one process (backend/cuda/allreduce.rs): one
// kernel, one pass. Each rank copies its values into its staging buffer, tells every rank
// so through a flag, waits for every rank's flag, then sums all staging buffers in rank
// order (in f32, rounded once), so every rank ends with bit-identical values. Block b of
// every rank handles the same slice and synchronises only with the blocks b of the others.
//
// `table` (in the rank's own memory) holds, per rank q, three device addresses the other
// ranks can reach: q's staging buffers 0 and 1 and q's flags. q's flag [r][b] is the last
// call number rank r's block b published to q. A block numbers its calls from its own flag
// entry (which only it writes), so graph replays need no host-side counter. Calls alternate
// staging buffers: a rank can be at most one call ahead of a peer still reading, because
// it cannot pass the next call's wait without that peer's next flag.

#define AR_MAX_RANKS 8
#define AR_BLOCKS 32

__device__ __forceinline__ u32 ld_acquire_sys(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(u32* p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Loads that skip the SM's L1 (another GPU may have written the line since it was cached).
__device__ __forceinline__ uint4 ld_cg_v4(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ bf16 ld_cg_u16(const bf16* p) {
    unsigned short v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// Phase one of a call, shared by the all-reduce and the all-gather: this block's slice of
// the `n` values (`[*u0, *u1)` in units of 8 values when `vec`, else 1), copied from `src`
// into this rank's staging buffer for the call, the call published to every rank, and
// every rank's publication awaited. Returns which staging buffer the call uses.
__device__ __forceinline__ int ar_publish(const bf16* src, int n, int rank, int world,
                                          const unsigned long long* table, int vec, int* u0,
                                          int* u1) {
    const int b = blockIdx.x;
    u32* my_flags = (u32*)table[rank * 3 + 2];
    __shared__ u32 call;
    if (threadIdx.x == 0) call = my_flags[rank * AR_BLOCKS + b] + 1u;
    __syncthreads();
    const u32 e = call;
    const int which = e & 1u;
    bf16* mine = (bf16*)table[rank * 3 + which];

    // This block's slice, in whole groups of 8 values (16 bytes) when `vec`.
    const int unit = vec ? 8 : 1;
    const int units = (n + unit - 1) / unit;
    const int per = (units + gridDim.x - 1) / gridDim.x;
    *u0 = min(units, b * per);
    *u1 = min(units, *u0 + per);

    if (vec) {
        const uint4* s = (const uint4*)src;
        uint4* dst = (uint4*)mine;
        for (int u = *u0 + threadIdx.x; u < *u1; u += blockDim.x) dst[u] = s[u];
    } else {
        for (int u = *u0 + threadIdx.x; u < *u1; u += blockDim.x) mine[u] = src[u];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        for (int q = 0; q < world; q++) {
            u32* f = (u32*)table[q * 3 + 2];
            st_release_sys(f + rank * AR_BLOCKS + b, e);
        }
    }
    if (threadIdx.x < world) {
        const u32* f = my_flags + threadIdx.x * AR_BLOCKS + b;
        while ((int)(ld_acquire_sys(f) - e) < 0) {
        }
    }
    __syncthreads();
    return which;
}

extern "C" __global__ void custom_all_reduce(bf16* data, int n, int rank, int world,
                                             const unsigned long long* table, int vec) {
    int u0, u1;
    const int which = ar_publish(data, n, rank, world, table, vec, &u0, &u1);

    if (vec) {
        for (int u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int q = 0; q < world; q++) {
                const uint4* s = (const uint4*)table[q * 3 + which];
                float f[8];
                unpack8(ld_cg_v4(s + u), f);
#pragma unroll
                for (int i = 0; i < 8; i++) acc[i] += f[i];
            }
            ((uint4*)data)[u] = pack8(acc);
        }
    } else {
        for (int u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
            float acc = 0.f;
            for (int q = 0; q < world; q++) {
                const bf16* s = (const bf16*)table[q * 3 + which];
                acc += bf2f(ld_cg_u16(s + u));
            }
            data[u] = f2bf(acc);
        }
    }
}

// The vocabulary-parallel output layer's gather, with the same calls and flags as the
// all-reduce: rank q's `[rows, c]` block of logits becomes columns q*c.. of every rank's
// `out` (`[rows, cols]`); columns past `cols` (the last rank's padding) are dropped. `vec`
// needs c and cols multiples of 8, so that a group of 8 never straddles a row or `cols`.
extern "C" __global__ void custom_all_gather(const bf16* local, int rows, int c, bf16* out,
                                             int cols, int rank, int world,
                                             const unsigned long long* table, int vec) {
    int u0, u1;
    const int which = ar_publish(local, rows * c, rank, world, table, vec, &u0, &u1);
    const int unit = vec ? 8 : 1;
    for (int q = 0; q < world; q++) {
        const bf16* s = (const bf16*)table[q * 3 + which];
        for (int u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
            const int i = u * unit, r = i / c, col = q * c + i % c;
            if (col >= cols) continue;
            bf16* dst = out + (size_t)r * cols + col;
            if (vec) {
                *(uint4*)dst = ld_cg_v4((const uint4*)(s + i));
            } else {
                *dst = ld_cg_u16(s + i);
            }
        }
    }
}

// `g` holds `world` blocks of `[rows, c]`, one per rank (an NCCL all-gather's layout);
// `out` (`[rows, cols]`) gets block q as columns q*c.., those past `cols` dropped. One
// thread per output value, or per 8 when `vec` (c and cols multiples of 8).
extern "C" __global__ void interleave_cols(const bf16* g, int rows, int c, int world,
                                           bf16* out, int cols, int vec) {
    const int unit = vec ? 8 : 1;
    const long long units = (long long)rows * cols / unit;
    for (long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x; u < units;
         u += (long long)gridDim.x * blockDim.x) {
        const long long i = u * unit;
        const int r = (int)(i / cols), col = (int)(i % cols);
        const int q = col / c, j = col % c;
        const bf16* src = g + ((size_t)q * rows + r) * c + j;
        if (vec) {
            ((uint4*)out)[u] = *(const uint4*)src;
        } else {
            out[i] = *src;
        }
    }
}
