// corral's CUDA kernels: the operations of `gpu/mod.rs`'s `Backend`, one kernel each, with the
// arithmetic of `gpu/host.rs` (the CPU reference the graph is tested with) and of the CPU
// forward pass (`llama.rs`): sums of squares in double, the cache and the attention weights
// rounded to f16, ggml's f16 GELU, fused multiply-adds where the CPU path has them.
//
// Compiled to PTX by NVRTC when the runner is built with the `cuda` feature (build.rs); the
// driver compiles the PTX for the GPU at load. No headers beyond NVRTC's own: f16 rounding is
// the PTX conversion instruction. With CORRAL_EMULATE the same source compiles as C++ for
// `emulate.cpp`, which runs it on CPU threads in tests.

typedef unsigned int u32;
typedef unsigned long long u64;
// -infinity, without <math.h> (NVRTC compiles without the system headers).
#define NEG_INF (-__int_as_float(0x7f800000))

// x rounded to the nearest f16 (ties to even) and back, as the F16C instruction the CPU
// path uses.
__device__ __forceinline__ float round_f16(float x) {
#ifdef CORRAL_EMULATE
    return (float)(_Float16)x;
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    float y;
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
    return y;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// A block-wide sum in double (blockDim.x a multiple of 32, at most 1024). Every thread gets it.
__device__ double block_sum_d(double v, double* shared32) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < warps; w++) t += shared32[w];
    return t;
}

__device__ float block_max(float v, float* shared32) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (int w = 0; w < warps; w++) t = fmaxf(t, shared32[w]);
    return t;
}

// out[r][j] = sum_i x[r][i] * w[j][i] for few rows (decoding): one warp per weight row, each
// weight read once for all rows (up to 8).
extern "C" __global__ void matvec(float* out, const float* x, const float* w, u32 rows, u32 k,
                                  u32 n) {
    u32 j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    u32 lane = threadIdx.x & 31;
    if (j >= n) return;
    const float* wr = w + (u64)j * k;
    float acc[8];
    for (int r = 0; r < 8; r++) acc[r] = 0.f;
    for (u32 i = lane; i < k; i += 32) {
        float wv = wr[i];
        for (u32 r = 0; r < rows && r < 8; r++) acc[r] = fmaf(x[(u64)r * k + i], wv, acc[r]);
    }
    for (u32 r = 0; r < rows && r < 8; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0) out[(u64)r * n + j] = s;
    }
}

// The same product for many rows (prefill): 64x64 output tiles, 16 wide steps along k through
// shared memory, 4x4 outputs per thread (256 threads).
#define TM 64
#define TN 64
#define TK 16
extern "C" __global__ void matmul(float* out, const float* x, const float* w, u32 rows, u32 k,
                                  u32 n) {
    __shared__ float xs[TK][TM + 4];
    __shared__ float ws[TK][TN + 4];
    u32 r0 = blockIdx.y * TM, j0 = blockIdx.x * TN;
    u32 tid = threadIdx.x;
    u32 tr = (tid / 16) * 4, tc = (tid % 16) * 4;
    float acc[4][4];
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++) acc[a][b] = 0.f;
    for (u32 k0 = 0; k0 < k; k0 += TK) {
        // 64 rows x 16 values of x and of w: 1024 each, 4 per thread.
        for (u32 e = tid; e < TM * TK; e += 256) {
            u32 rr = e / TK, kk = e % TK;
            u32 gr = r0 + rr, gk = k0 + kk;
            xs[kk][rr] = (gr < rows && gk < k) ? x[(u64)gr * k + gk] : 0.f;
            u32 gj = j0 + rr;
            ws[kk][rr] = (gj < n && gk < k) ? w[(u64)gj * k + gk] : 0.f;
        }
        __syncthreads();
        for (u32 kk = 0; kk < TK; kk++) {
            float xv[4], wv[4];
            for (int a = 0; a < 4; a++) xv[a] = xs[kk][tr + a];
            for (int b = 0; b < 4; b++) wv[b] = ws[kk][tc + b];
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++) acc[a][b] = fmaf(xv[a], wv[b], acc[a][b]);
        }
        __syncthreads();
    }
    for (int a = 0; a < 4; a++) {
        u32 gr = r0 + tr + a;
        if (gr >= rows) continue;
        for (int b = 0; b < 4; b++) {
            u32 gj = j0 + tc + b;
            if (gj < n) out[(u64)gr * n + gj] = acc[a][b];
        }
    }
}

// Row-wise RMS norm times w: one block per row, the sum of squares in double (as ggml's).
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, u32 n, float eps) {
    __shared__ double part[32];
    const float* xr = x + (u64)blockIdx.x * n;
    float* o = out + (u64)blockIdx.x * n;
    double s = 0.0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        s += (double)(v * v);
    }
    s = block_sum_d(s, part);
    float mean = (float)(s / (double)n);
    float scale = 1.0f / sqrtf(mean + eps);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// x[r][i] += b[i] for each of `total / n` rows.
extern "C" __global__ void add_rows(float* x, const float* b, u32 total, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += b[i % n];
}

extern "C" __global__ void add(float* x, const float* y, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void scale(float* x, u32 n, float s) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

extern "C" __global__ void round_f16_all(float* x, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = round_f16(x[i]);
}

// Rotary embeddings of the first n_rot dims of each head: adjacent pairs (2k, 2k+1), or halves
// (k, k + n_rot/2) for NeoX. cs holds per row n_rot/2 (cos, sin) pairs. One thread per pair.
extern "C" __global__ void rope(float* x, const float* cs, u32 rows, u32 n_head, u32 head_dim,
                                u32 n_rot, u32 neox) {
    u32 half = n_rot / 2;
    u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * n_head * half) return;
    u32 k = t % half, h = (t / half) % n_head, r = t / (half * n_head);
    float c = cs[((u64)r * half + k) * 2], s = cs[((u64)r * half + k) * 2 + 1];
    float* head = x + ((u64)r * n_head + h) * head_dim;
    u32 i0 = neox ? k : 2 * k, i1 = neox ? k + half : 2 * k + 1;
    float a = head[i0], b = head[i1];
    head[i0] = fmaf(a, c, -(b * s));
    head[i1] = fmaf(a, s, b * c);
}

// act = GELU(g) * u (Gemma; ggml's f16 table: the input rounded to f16, the value rounded to
// f16, saturated outside (-10, 10)) or SiLU(g) * u.
extern "C" __global__ void gated(float* g, const float* u, u32 n, u32 gelu) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = g[i], r;
    if (gelu) {
        if (a <= -10.f) {
            r = 0.f;
        } else if (a >= 10.f) {
            r = a;
        } else {
            float v = round_f16(a);
            r = round_f16(0.5f * v * (1.f + tanhf(0.7978846f * v * (1.f + 0.044715f * v * v))));
        }
    } else {
        r = a / (1.f + expf(0.f - a));
    }
    g[i] = r * u[i];
}

extern "C" __global__ void softcap(float* x, u32 n, float cap) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = tanhf(x[i] * (1.f / cap)) * cap;
}

// Attention of `rows` query rows (positions pos.. of one sequence) over its cache: one block
// per (row, head). Scores in dynamic shared memory (one per key, pos + row + 1 of them), then
// the softmax, the weights rounded to f16, and the weighted sum of the values.
// q and out: `[row][n_head * head_dim]` from row `q_row`; kc, vc: `[position][kv_dim]`.
extern "C" __global__ void attention(float* out, const float* q, const float* kc, const float* vc,
                                     u32 q_row, u32 pos, u32 n_head, u32 group, u32 head_dim,
                                     u32 kv_dim, float scale, float softcap, u32 window) {
#ifdef CORRAL_EMULATE
    float* smem = emulated_dynamic_shared();
#else
    extern __shared__ float smem[];
#endif
    __shared__ double part[32];
    __shared__ float partf[32];
    u32 i = blockIdx.x, hh = blockIdx.y;
    u32 q_dim = n_head * head_dim;
    u32 n_ctx = pos + i + 1;
    u32 lo = (window > 0 && n_ctx > window) ? n_ctx - window : 0;
    u32 kvh = hh / group;
    float* q16 = smem;             // head_dim
    float* s = smem + head_dim;    // n_ctx
    const float* qr = q + ((u64)(q_row + i)) * q_dim + (u64)hh * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) q16[d] = round_f16(qr[d]);
    __syncthreads();
    // Scores: one warp per key, its lanes across the head (each key row read in one coalesced
    // sweep), summed across the warp.
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float local_max = NEG_INF;
    for (u32 j = warp; j < n_ctx; j += warps) {
        float v;
        if (j < lo) {
            v = NEG_INF;
        } else {
            const float* kr = kc + (u64)j * kv_dim + (u64)kvh * head_dim;
            float dot = 0.f;
            for (u32 d = lane; d < head_dim; d += 32) dot = fmaf(kr[d], q16[d], dot);
            dot = warp_sum(dot);
            v = softcap > 0.f ? tanhf(dot * (1.f / softcap)) * softcap * scale : dot * scale;
        }
        if (lane == 0) s[j] = v;
        local_max = fmaxf(local_max, v);
    }
    float mx = block_max(local_max, partf);
    double sum = 0.0;
    for (u32 j = threadIdx.x; j < n_ctx; j += blockDim.x) {
        float e = s[j] == NEG_INF ? 0.f : expf(s[j] - mx);
        s[j] = e;
        sum += (double)e;
    }
    sum = block_sum_d(sum, part);
    float inv = (float)(1.0 / sum);
    for (u32 j = threadIdx.x; j < n_ctx; j += blockDim.x) s[j] = round_f16(s[j] * inv);
    __syncthreads();
    float* o = out + ((u64)(q_row + i)) * q_dim + (u64)hh * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        const float* vcol = vc + (u64)kvh * head_dim + d;
        float acc = 0.f;
        for (u32 j = lo; j < n_ctx; j++) acc = fmaf(s[j], vcol[(u64)j * kv_dim], acc);
        o[d] = acc;
    }
}
