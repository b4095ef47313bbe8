// ggrun's CUDA kernels, compiled by NVRTC on first use (backend/cuda/mod.rs caches the PTX per GPU
// architecture). Weights stay in their GGUF block layout on the device; every kernel here reads
// them through `deq8`, which dequantizes eight consecutive elements of a row exactly as the CPU
// reference does (ggrun_quants' dequantize_*), so the GPU computes the same function.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// Type ids: ggml's (GgmlType::id).
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q2_K 10
#define T_Q3_K 11
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_IQ4_NL 20
#define T_BF16 30

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float f16at(const u8* p) { return half_to_float((u16)(p[0] | (p[1] << 8))); }

__device__ __constant__ i8 IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                         1,    13,   25,  38,  53,  69,  89,  113};

// Q4_K / Q5_K: the 6-bit (scale, min) of sub-block j.
__device__ __forceinline__ void scale_min_k4(int j, const u8* s, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q3_K: signed scale of sub-block j (0..16).
__device__ __forceinline__ int q3k_scale(int j, const u8* s) {
    int i = j / 4, k = j % 4;
    int src = s[(i & 1) * 4 + k];
    int low = i < 2 ? (src & 15) : (src >> 4);
    int high = (s[8 + k] >> (2 * i)) & 3;
    return (low | (high << 4)) - 32;
}

// Elements e0..e0+7 (e0 a multiple of 8) of a row of type T.
template <int T>
__device__ __forceinline__ void deq8(const u8* row, int e0, float* w) {
    if (T == T_F32) {
        const float* r = (const float*)row;
        for (int i = 0; i < 8; i++) w[i] = r[e0 + i];
    } else if (T == T_F16) {
        for (int i = 0; i < 8; i++) w[i] = f16at(row + 2 * (e0 + i));
    } else if (T == T_BF16) {
        for (int i = 0; i < 8; i++) {
            u32 b = (u32)(row[2 * (e0 + i)] | (row[2 * (e0 + i) + 1] << 8)) << 16;
            w[i] = __uint_as_float(b);
        }
    } else if (T == T_Q8_0) {
        const u8* b = row + (e0 / 32) * 34;
        float d = f16at(b);
        int j = e0 % 32;
        for (int i = 0; i < 8; i++) w[i] = (float)(i8)b[2 + j + i] * d;
    } else if (T == T_Q4_0 || T == T_IQ4_NL) {
        const u8* b = row + (e0 / 32) * 18;
        float d = f16at(b);
        int j = e0 % 32;
        for (int i = 0; i < 8; i++) {
            int e = j + i;
            int q = e < 16 ? (b[2 + e] & 15) : (b[2 + e - 16] >> 4);
            w[i] = T == T_Q4_0 ? (float)(q - 8) * d : (float)IQ4NL[q] * d;
        }
    } else if (T == T_Q4_1) {
        const u8* b = row + (e0 / 32) * 20;
        float d = f16at(b), m = f16at(b + 2);
        int j = e0 % 32;
        for (int i = 0; i < 8; i++) {
            int e = j + i;
            int q = e < 16 ? (b[4 + e] & 15) : (b[4 + e - 16] >> 4);
            w[i] = (float)q * d + m;
        }
    } else if (T == T_Q5_0) {
        const u8* b = row + (e0 / 32) * 22;
        float d = f16at(b);
        u32 qh = b[2] | (b[3] << 8) | (b[4] << 16) | ((u32)b[5] << 24);
        int j = e0 % 32;
        for (int i = 0; i < 8; i++) {
            int e = j + i;
            int q = (e < 16 ? (b[6 + e] & 15) : (b[6 + e - 16] >> 4)) | (((qh >> e) & 1) << 4);
            w[i] = (float)(q - 16) * d;
        }
    } else if (T == T_Q5_1) {
        const u8* b = row + (e0 / 32) * 24;
        float d = f16at(b), m = f16at(b + 2);
        u32 qh = b[4] | (b[5] << 8) | (b[6] << 16) | ((u32)b[7] << 24);
        int j = e0 % 32;
        for (int i = 0; i < 8; i++) {
            int e = j + i;
            int q = (e < 16 ? (b[8 + e] & 15) : (b[8 + e - 16] >> 4)) | (((qh >> e) & 1) << 4);
            w[i] = (float)q * d + m;
        }
    } else if (T == T_Q2_K) {
        const u8* b = row + (e0 / 256) * 84;
        float d = f16at(b + 80), dmin = f16at(b + 82);
        int e = e0 % 256;
        int half = e / 128, p = (e % 128) / 32, l = e % 32;
        int sc = b[e / 16];
        float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        for (int i = 0; i < 8; i++) {
            int q = (b[16 + 32 * half + l + i] >> (2 * p)) & 3;
            w[i] = dl * (float)q - ml;
        }
    } else if (T == T_Q3_K) {
        const u8* b = row + (e0 / 256) * 110;
        float d = f16at(b + 108);
        int e = e0 % 256;
        int half = e / 128, p = (e % 128) / 32, l = e % 32;
        float dl = d * (float)q3k_scale(e / 16, b + 96);
        for (int i = 0; i < 8; i++) {
            int q = (b[32 + 32 * half + l + i] >> (2 * p)) & 3;
            int hbit = (b[l + i] >> (4 * half + p)) & 1;
            w[i] = dl * (float)(q - (hbit ? 0 : 4));
        }
    } else if (T == T_Q4_K || T == T_Q5_K) {
        const int bytes = T == T_Q4_K ? 144 : 176;
        const u8* b = row + (e0 / 256) * bytes;
        float d = f16at(b), dmin = f16at(b + 2);
        int e = e0 % 256;
        int c = e / 64, hi = (e % 64) >= 32, l = e % 32;
        int sc, mn;
        scale_min_k4(e / 32, b + 4, &sc, &mn);
        float dl = d * (float)sc, ml = dmin * (float)mn;
        const u8* qs = b + (T == T_Q4_K ? 16 : 48);
        for (int i = 0; i < 8; i++) {
            int v = qs[32 * c + l + i];
            int q = hi ? (v >> 4) : (v & 15);
            if (T == T_Q5_K) q |= ((b[16 + l + i] >> (2 * c + hi)) & 1) << 4;
            w[i] = dl * (float)q - ml;
        }
    } else if (T == T_Q6_K) {
        const u8* b = row + (e0 / 256) * 210;
        float d = f16at(b + 208);
        int e = e0 % 256;
        int half = e / 128, quarter = (e % 128) / 32, l = e % 32;
        const u8* ql = b + 64 * half;
        const u8* qh = b + 128 + 32 * half;
        float dl = d * (float)(i8)b[192 + e / 16];
        for (int i = 0; i < 8; i++) {
            int lo = (quarter & 1) ? ql[l + i + 32] : ql[l + i];
            lo = (quarter & 2) ? (lo >> 4) : (lo & 15);
            int q = lo | (((qh[l + i] >> (2 * quarter)) & 3) << 4);
            w[i] = dl * (float)(q - 32);
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// y[t][r] = Σ_c w[r][c] · x[t][c] for `tokens` rows of x: one warp per (row, token), each lane
// taking eight consecutive elements of every 256 (so a warp walks the row in 256-element steps).
template <int T>
__device__ void matmul(const u8* w, const float* x, float* y, int rows, int cols, long long row_bytes,
                       int tokens) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    int r = warp;
    int t = blockIdx.y;
    if (r >= rows || t >= tokens) return;
    const u8* row = w + (long long)r * row_bytes;
    const float* xt = x + (long long)t * cols;
    float acc = 0.0f;
    float v[8];
    for (int base = 0; base < cols; base += 256) {
        int e0 = base + 8 * lane;
        if (e0 < cols) {
            deq8<T>(row, e0, v);
            for (int i = 0; i < 8; i++) acc = fmaf(v[i], xt[e0 + i], acc);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(long long)t * rows + r] = acc;
}

#define MATMUL(name, T)                                                                          \
    extern "C" __global__ void name(const u8* w, const float* x, float* y, int rows, int cols,   \
                                    long long row_bytes, int tokens) {                          \
        matmul<T>(w, x, y, rows, cols, row_bytes, tokens);                                       \
    }

MATMUL(matmul_f32, T_F32)
MATMUL(matmul_f16, T_F16)
MATMUL(matmul_bf16, T_BF16)
MATMUL(matmul_q4_0, T_Q4_0)
MATMUL(matmul_q4_1, T_Q4_1)
MATMUL(matmul_q5_0, T_Q5_0)
MATMUL(matmul_q5_1, T_Q5_1)
MATMUL(matmul_q8_0, T_Q8_0)
MATMUL(matmul_iq4_nl, T_IQ4_NL)
MATMUL(matmul_q2_k, T_Q2_K)
MATMUL(matmul_q3_k, T_Q3_K)
MATMUL(matmul_q4_k, T_Q4_K)
MATMUL(matmul_q5_k, T_Q5_K)
MATMUL(matmul_q6_k, T_Q6_K)

// Prefill: y[t][r] for a tile of 32 rows × 64 tokens per block of 256 threads. Per step of 64
// columns the block dequantizes the tile's weights once into shared memory (deq8, as above) and
// stages the tokens' activations beside them; thread (row = tid % 32, tokens 8·(tid / 32) ..+8)
// then accumulates eight outputs. The weight rows are padded by one float so that a warp's 32
// rows fall in 32 different banks; a token's activation is one broadcast read.
#define TILE_ROWS 32
#define TILE_TOKENS 64
#define TILE_K 64

template <int T>
__device__ void matmul_tiled(const u8* w, const float* x, float* y, int rows, int cols,
                             long long row_bytes, int tokens) {
    __shared__ float ws[TILE_ROWS][TILE_K + 1];
    __shared__ float xs[TILE_TOKENS][TILE_K];
    int tid = threadIdx.x;
    int r0 = blockIdx.x * TILE_ROWS, t0 = blockIdx.y * TILE_TOKENS;
    int lr = tid % 32, lt = (tid / 32) * 8;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float v[8];
    for (int k0 = 0; k0 < cols; k0 += TILE_K) {
        // Weights: 32 rows × 64 columns = 256 runs of eight, one per thread.
        for (int i = tid; i < TILE_ROWS * TILE_K / 8; i += blockDim.x) {
            int rr = i / (TILE_K / 8), c = (i % (TILE_K / 8)) * 8;
            int r = r0 + rr, e0 = k0 + c;
            if (r < rows && e0 < cols) {
                deq8<T>(w + (long long)r * row_bytes, e0, v);
            } else {
                for (int j = 0; j < 8; j++) v[j] = 0.0f;
            }
            for (int j = 0; j < 8; j++) ws[rr][c + j] = v[j];
        }
        // Activations: 64 tokens × 64 columns.
        for (int i = tid; i < TILE_TOKENS * TILE_K; i += blockDim.x) {
            int tt = i / TILE_K, c = i % TILE_K;
            int t = t0 + tt, e = k0 + c;
            xs[tt][c] = (t < tokens && e < cols) ? x[(long long)t * cols + e] : 0.0f;
        }
        __syncthreads();
        for (int c = 0; c < TILE_K; c++) {
            float wv = ws[lr][c];
            for (int j = 0; j < 8; j++) acc[j] = fmaf(wv, xs[lt + j][c], acc[j]);
        }
        __syncthreads();
    }
    int r = r0 + lr;
    if (r < rows) {
        for (int j = 0; j < 8; j++) {
            int t = t0 + lt + j;
            if (t < tokens) y[(long long)t * rows + r] = acc[j];
        }
    }
}

#define MATMUL_TILED(name, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) name(const u8* w, const float* x, float* y,\
                                    int rows, int cols, long long row_bytes, int tokens) {        \
        matmul_tiled<T>(w, x, y, rows, cols, row_bytes, tokens);                                 \
    }

MATMUL_TILED(matmul_tiled_f32, T_F32)
MATMUL_TILED(matmul_tiled_f16, T_F16)
MATMUL_TILED(matmul_tiled_bf16, T_BF16)
MATMUL_TILED(matmul_tiled_q4_0, T_Q4_0)
MATMUL_TILED(matmul_tiled_q4_1, T_Q4_1)
MATMUL_TILED(matmul_tiled_q5_0, T_Q5_0)
MATMUL_TILED(matmul_tiled_q5_1, T_Q5_1)
MATMUL_TILED(matmul_tiled_q8_0, T_Q8_0)
MATMUL_TILED(matmul_tiled_iq4_nl, T_IQ4_NL)
MATMUL_TILED(matmul_tiled_q2_k, T_Q2_K)
MATMUL_TILED(matmul_tiled_q3_k, T_Q3_K)
MATMUL_TILED(matmul_tiled_q4_k, T_Q4_K)
MATMUL_TILED(matmul_tiled_q5_k, T_Q5_K)
MATMUL_TILED(matmul_tiled_q6_k, T_Q6_K)

// Nemotron-H's feed-forward activation, in place: max(x, 0)².
extern "C" __global__ void relu2(float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        x[i] = v > 0.0f ? v * v : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Mamba-2 on the device (building blocks of the device-resident forward pass).

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Causal depthwise convolution of `t` rows of xBC (t × ch) with per-channel kernels w (ch × k)
// and an optional bias, then SiLU; `state` holds the previous k − 1 inputs (rows, oldest first)
// and is left holding the last k − 1. One thread per channel walks the tokens in order.
extern "C" __global__ void mamba_conv(const float* x, float* state, const float* w,
                                      const float* bias, float* out, int t, int ch, int k) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= ch || k < 1 || k > 8) return;
    float win[8];
    for (int j = 0; j < k - 1; j++) win[j] = state[j * ch + c];
    for (int ti = 0; ti < t; ti++) {
        float xv = x[(long long)ti * ch + c];
        float acc = 0.0f;
        for (int j = 0; j < k - 1; j++) acc = fmaf(win[j], w[c * k + j], acc);
        acc = fmaf(xv, w[c * k + k - 1], acc);
        if (bias) acc += bias[c];
        out[(long long)ti * ch + c] = silu(acc);
        for (int j = 0; j + 1 < k - 1; j++) win[j] = win[j + 1];
        if (k > 1) win[k - 2] = xv;
    }
    for (int j = 0; j < k - 1; j++) state[j * ch + c] = win[j];
}

// The selective scan. Block (i, h): row i of head h; thread n owns state element n. Per token:
// s = s·exp(dt·a_h) + x·dt·B_g[n], y = Σ_n s·C_g[n] + x·D_h (B and C of the head's group g).
// xbc is the conv output (t × ch: x | B | C), dt the softplus-ed steps (t × n_head), y is
// t × d_inner, ssm is n_head × head_dim × d_state.
extern "C" __global__ void mamba_scan(const float* xbc, const float* dt, const float* a,
                                      const float* d, float* ssm, float* y, int t, int d_inner,
                                      int d_state, int n_head, int n_group) {
    __shared__ float part[32];
    int i = blockIdx.x, h = blockIdx.y, n = threadIdx.x;
    int hd = d_inner / n_head, g = h / (n_head / n_group);
    int ch = d_inner + 2 * n_group * d_state;
    float* st = ssm + ((long long)h * hd + i) * d_state;
    float s = n < d_state ? st[n] : 0.0f;
    for (int ti = 0; ti < t; ti++) {
        const float* row = xbc + (long long)ti * ch;
        float x = row[h * hd + i];
        float dth = dt[ti * n_head + h];
        float da = expf(dth * a[h]);
        float contrib = 0.0f;
        if (n < d_state) {
            float b = row[d_inner + g * d_state + n];
            float c = row[d_inner + n_group * d_state + g * d_state + n];
            s = fmaf(s, da, x * dth * b);
            contrib = s * c;
        }
        for (int o = 16; o > 0; o >>= 1) contrib += __shfl_xor_sync(0xffffffffu, contrib, o);
        if (n % 32 == 0) part[n / 32] = contrib;
        __syncthreads();
        if (n == 0) {
            float sum = 0.0f;
            for (int wv = 0; wv < (blockDim.x + 31) / 32; wv++) sum += part[wv];
            y[(long long)ti * d_inner + h * hd + i] = sum + x * d[h];
        }
        __syncthreads();
    }
    if (n < d_state) st[n] = s;
}
