// ggrun's CUDA kernels, compiled by NVRTC on first use (backend/cuda/mod.rs caches the PTX per GPU
// architecture). Weights stay in their GGUF block layout on the device; every kernel here reads
// them through `deq8`, which dequantizes eight consecutive elements of a row exactly as the CPU
// reference does (ggrun_quants' dequantize_*), so the GPU computes the same function.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// Every weight type with kernels, as X(suffix, type id): each product family below is
// instantiated for all of them, named matmul_<suffix>, matmul_<suffix>_id, matmul_tiled_<suffix>
// and matmul_mma_<suffix> (kernel_name in mod.rs builds the same names).
#define FOR_EACH_TYPE(X) \
    X(f32, T_F32) \
    X(f16, T_F16) \
    X(bf16, T_BF16) \
    X(q4_0, T_Q4_0) \
    X(q4_1, T_Q4_1) \
    X(q5_0, T_Q5_0) \
    X(q5_1, T_Q5_1) \
    X(q8_0, T_Q8_0) \
    X(iq4_nl, T_IQ4_NL) \
    X(mxfp4, T_MXFP4) \
    X(q2_k, T_Q2_K) \
    X(q3_k, T_Q3_K) \
    X(q4_k, T_Q4_K) \
    X(q5_k, T_Q5_K) \
    X(q6_k, T_Q6_K)

// −∞ (NVRTC has no math.h).
#define NEG_INF __int_as_float(0xff800000)

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
#define T_MXFP4 39

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float f16at(const u8* p) { return half_to_float((u16)(p[0] | (p[1] << 8))); }

// The 16-entry value tables of IQ4_NL and MXFP4 are not read from __constant__ memory: its
// reads serialize when the lanes of a warp ask for different entries, as dequantizing lanes do
// (MXFP4 decode ran at ~5% of the memory bandwidth that way).

// IQ4_NL's value of nibble q (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69,
// 89, 113), by a byte permute of the table held in immediates.
__device__ __forceinline__ int iq4nl_value(int q) {
    u32 v = q & 8 ? __byte_perm(0x26190D01u, 0x71594535u, q & 7)
                  : __byte_perm(0xBFAD9881u, 0xF6EADDCFu, q & 7);
    return (int)(i8)(v & 0xff);
}

// MXFP4: twice the E2M1 value of nibble q (0, 1, 2, 3, 4, 6, 8, 12, and their negatives for
// q ≥ 8), and 2^(e − 128) from the block's exponent byte (the bits of that float; e < 2 are
// the subnormals), as ggrun_quants::mxfp4.
__device__ __forceinline__ int fp4_value(int q) {
    int m = q & 7;
    int v = m < 4 ? m : (2 + (m & 1)) << ((m >> 1) - 1);
    return q & 8 ? -v : v;
}
__device__ __forceinline__ float e8m0_half(u8 e) {
    return __int_as_float(e < 2 ? (0x00200000 << e) : ((int)(e - 1) << 23));
}

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
            w[i] = T == T_Q4_0 ? (float)(q - 8) * d : (float)iq4nl_value(q) * d;
        }
    } else if (T == T_MXFP4) {
        const u8* b = row + (e0 / 32) * 17;
        float d = e8m0_half(b[0]);
        int j = e0 % 32;
        for (int i = 0; i < 8; i++) {
            int e = j + i;
            int q = e < 16 ? (b[1 + e] & 15) : (b[1 + e - 16] >> 4);
            w[i] = (float)fp4_value(q) * d;
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

// What a product does with each result: store it, add it to what is there, or store relu(v)²
// (Nemotron's feed-forward activation, fused into the up products).
#define EPI_STORE 0
#define EPI_ADD 1
#define EPI_RELU2 2

__device__ __forceinline__ void put(float* out, float v, int epi) {
    if (epi == EPI_RELU2) v = v > 0.0f ? v * v : 0.0f;
    *out = epi == EPI_ADD ? *out + v : v;
}

// The decode kernels: a block of MV_WARPS warps computes MV_ROWS rows for one token. Warp w
// takes the 256-element chunks w, w + MV_WARPS, ... of the rows, each lane eight consecutive
// elements of a chunk; the rows share each load of the activations, and every weight load is
// unconditional (a chunk past the end reads the first one and is not summed), so the loads of
// all MV_ROWS rows are in flight together. Partial sums meet in shared memory.
#define MV_WARPS 4
#define MV_ROWS 4

// Eight activations x[e0..e0+8), as two 16-byte loads where aligned.
__device__ __forceinline__ void load_x8(const float* x, int e0, float* xv) {
    const float* p = x + e0;
    if (((unsigned long long)p & 15) == 0) {
        float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
        xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
        xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
    } else {
        for (int i = 0; i < 8; i++) xv[i] = p[i];
    }
}

// The block's per-warp partial sums `acc` of MV_ROWS rows meet in shared memory: thread j < n
// returns row j's total (the others 0).
__device__ __forceinline__ float rows_total(const float* acc, int n) {
    __shared__ float part[MV_WARPS][MV_ROWS];
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) {
        float s = warp_sum(acc[j]);
        if (lane == 0) part[wid][j] = s;
    }
    __syncthreads();
    float sum = 0.0f;
    if (threadIdx.x < n) {
        for (int i = 0; i < MV_WARPS; i++) sum += part[i][threadIdx.x];
    }
    return sum;
}

// Σ_c row_j[c] · x[c] for the first `n` (≤ MV_ROWS) of the rows at w + j·row_bytes, by the
// whole block; thread j < n returns row j's sum (others return 0).
template <int T>
__device__ __forceinline__ float rows_dot(const u8* w, long long row_bytes, int n, const float* x,
                                          int cols) {
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    float acc[MV_ROWS] = {};
    const u8* rowp[MV_ROWS];
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) rowp[j] = w + (j < n ? j : 0) * row_bytes;
    float v[8], xv[8];
    for (int base = wid * 256; base < cols; base += 256 * MV_WARPS) {
        int e0 = base + 8 * lane;
        bool ok = e0 < cols;
        int e = ok ? e0 : 0;
        load_x8(x, e, xv);
#pragma unroll
        for (int j = 0; j < MV_ROWS; j++) {
            deq8<T>(rowp[j], e, v);
            if (ok) {
                for (int i = 0; i < 8; i++) acc[j] = fmaf(v[i], xv[i], acc[j]);
            }
        }
    }
    return rows_total(acc, n);
}

// Decode with int8 activations (normal precision), for the legacy and K-quant block types: each
// lane quantizes its eight activations against the absolute maximum of their block of 32 (the
// four lanes of a block agree through two shuffles), as llama.cpp's q8_1 does, and multiplies
// them with the weights' integers four at a time (dp4a) instead of converting every weight to
// float. The activations of a chunk are quantized once and shared by the block's MV_ROWS rows.
// A lane's eight weights are d · q + m with one scale d and offset m (a K-quant's sub-block
// scale and minimum folded in), so its share is d · dx · Σ q·xq + m · Σ x.
#define FOR_EACH_INT8_TYPE(X) \
    X(q4_0, T_Q4_0) \
    X(q4_1, T_Q4_1) \
    X(q5_0, T_Q5_0) \
    X(q5_1, T_Q5_1) \
    X(q8_0, T_Q8_0) \
    X(q2_k, T_Q2_K) \
    X(q3_k, T_Q3_K) \
    X(q4_k, T_Q4_K) \
    X(q5_k, T_Q5_K) \
    X(q6_k, T_Q6_K)

// Four bytes at a 2-byte aligned address (every quant field these types use is one).
__device__ __forceinline__ int ld_a2(const u8* p) {
    const u16* q = (const u16*)p;
    return (int)((u32)q[0] | ((u32)q[1] << 16));
}

// Bits 0..3 of b moved to bit 0 of bytes 0..3.
__device__ __forceinline__ int spread4(u32 b) {
    return (int)((b & 1) | ((b & 2) << 7) | ((b & 4) << 14) | ((b & 8) << 21));
}

// Bytes and elements of a block of type T, and whether its values carry an offset.
template <int T> struct Block32 {
    static const int elems = T == T_Q2_K || T == T_Q3_K || T == T_Q4_K || T == T_Q5_K || T == T_Q6_K ? 256 : 32;
    static const int bytes = T == T_Q8_0 ? 34 : T == T_Q4_0 ? 18 : T == T_Q4_1 ? 20 : T == T_Q5_0 ? 22
                           : T == T_Q5_1 ? 24 : T == T_Q2_K ? 84 : T == T_Q3_K ? 110 : T == T_Q4_K ? 144
                           : T == T_Q5_K ? 176 : 210;
    static const int has_min = T == T_Q4_1 || T == T_Q5_1 || T == T_Q2_K || T == T_Q4_K || T == T_Q5_K;
};

// Elements j..j+7 (j a multiple of 8) of the block at b as two words of four signed bytes q,
// with their scale d and offset m: value = d · q + m.
template <int T>
__device__ __forceinline__ void block_ints(const u8* b, int j, int* w, float* d, float* m) {
    if (T == T_Q4_K || T == T_Q5_K) {
        // Sub-block j / 32 of 64-element pairs c: low nibbles, then high; Q5_K's fifth bits
        // in qh bit 2c + hi of each element's byte.
        int c = j / 64, hi = (j % 64) >= 32, l = j % 32, sc, mn;
        scale_min_k4(j / 32, b + 4, &sc, &mn);
        *d = f16at(b) * (float)sc;
        *m = -f16at(b + 2) * (float)mn;
        const u8* q = b + (T == T_Q4_K ? 16 : 48) + 32 * c + l;
        int shift = hi ? 4 : 0;
        int lo = (ld_a2(q) >> shift) & 0x0F0F0F0F, up = (ld_a2(q + 4) >> shift) & 0x0F0F0F0F;
        if (T == T_Q5_K) {
            int bit = 2 * c + hi;
            lo |= ((ld_a2(b + 16 + l) >> bit) & 0x01010101) << 4;
            up |= ((ld_a2(b + 20 + l) >> bit) & 0x01010101) << 4;
        }
        w[0] = lo;
        w[1] = up;
        return;
    }
    if (T == T_Q6_K) {
        int half = j / 128, quarter = (j % 128) / 32, l = j % 32;
        *d = f16at(b + 208) * (float)(i8)b[192 + j / 16];
        *m = 0.0f;
        const u8* ql = b + 64 * half + (quarter & 1 ? 32 : 0) + l;
        const u8* qh = b + 128 + 32 * half + l;
        int shift = quarter & 2 ? 4 : 0;
        for (int h = 0; h < 2; h++) {
            int lo = (ld_a2(ql + 4 * h) >> shift) & 0x0F0F0F0F;
            int hb = ((ld_a2(qh + 4 * h) >> (2 * quarter)) & 0x03030303) << 4;
            w[h] = __vsubss4(lo | hb, 0x20202020);
        }
        return;
    }
    if (T == T_Q3_K) {
        int half = j / 128, p = (j % 128) / 32, l = j % 32;
        *d = f16at(b + 108) * (float)q3k_scale(j / 16, b + 96);
        *m = 0.0f;
        for (int h = 0; h < 2; h++) {
            int q = (ld_a2(b + 32 + 32 * half + l + 4 * h) >> (2 * p)) & 0x03030303;
            int hb = (ld_a2(b + l + 4 * h) >> (4 * half + p)) & 0x01010101;
            w[h] = __vsubss4(q | (hb << 2), 0x04040404);
        }
        return;
    }
    if (T == T_Q2_K) {
        int half = j / 128, p = (j % 128) / 32, l = j % 32;
        int sc = b[j / 16];
        *d = f16at(b + 80) * (float)(sc & 15);
        *m = -f16at(b + 82) * (float)(sc >> 4);
        for (int h = 0; h < 2; h++) w[h] = (ld_a2(b + 16 + 32 * half + l + 4 * h) >> (2 * p)) & 0x03030303;
        return;
    }
    *d = f16at(b);
    *m = Block32<T>::has_min ? f16at(b + 2) : 0.0f;
    if (T == T_Q8_0) {
        w[0] = ld_a2(b + 2 + j);
        w[1] = ld_a2(b + 6 + j);
        return;
    }
    const int qh_at = Block32<T>::has_min ? 4 : 2;
    const int qs_at = qh_at + (T == T_Q5_0 || T == T_Q5_1 ? 4 : 0);
    const u8* q = b + qs_at + (j & 15);
    int shift = j >= 16 ? 4 : 0;
    int lo = (ld_a2(q) >> shift) & 0x0F0F0F0F, hi = (ld_a2(q + 4) >> shift) & 0x0F0F0F0F;
    if (T == T_Q5_0 || T == T_Q5_1) {
        u32 qh = (u32)ld_a2(b + qh_at) >> j;
        lo |= spread4(qh & 15) << 4;
        hi |= spread4((qh >> 4) & 15) << 4;
    }
    if (T == T_Q4_0) {
        lo = __vsubss4(lo, 0x08080808);
        hi = __vsubss4(hi, 0x08080808);
    } else if (T == T_Q5_0) {
        lo = __vsubss4(lo, 0x10101010);
        hi = __vsubss4(hi, 0x10101010);
    }
    w[0] = lo;
    w[1] = hi;
}

// rows_dot with int8 activations (see above); the same contract.
template <int T>
__device__ __forceinline__ float rows_dot_i8(const u8* w, long long row_bytes, int n, const float* x,
                                             int cols) {
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    float acc[MV_ROWS] = {};
    const u8* rowp[MV_ROWS];
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) rowp[j] = w + (j < n ? j : 0) * row_bytes;
    float xv[8];
    for (int base = wid * 256; base < cols; base += 256 * MV_WARPS) {
        int e0 = base + 8 * lane;
        bool ok = e0 < cols;
        int e = ok ? e0 : 0;
        load_x8(x, e, xv);
        float amax = 0.0f, sx = 0.0f;
        for (int i = 0; i < 8; i++) {
            amax = fmaxf(amax, fabsf(xv[i]));
            sx += xv[i];
        }
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int xq[2];
        for (int h = 0; h < 2; h++) {
            u32 v = 0;
            for (int i = 0; i < 4; i++) v |= (u32)(__float2int_rn(xv[4 * h + i] * inv) & 255) << (8 * i);
            xq[h] = (int)v;
        }
        long long blk = (long long)(e / Block32<T>::elems) * Block32<T>::bytes;
#pragma unroll
        for (int j = 0; j < MV_ROWS; j++) {
            int wq[2];
            float d, m;
            block_ints<T>(rowp[j] + blk, e % Block32<T>::elems, wq, &d, &m);
            int s = __dp4a(wq[1], xq[1], __dp4a(wq[0], xq[0], 0));
            if (ok) acc[j] += d * dx * (float)s + (Block32<T>::has_min ? m * sx : 0.0f);
        }
    }
    return rows_total(acc, n);
}

// y[t][r] = Σ_c w[r][c] · x[t][c] for `tokens` rows of x (written as `epi` says): one block
// per MV_ROWS rows and token; with I8, activations in int8 (rows_dot_i8).
template <int T, bool I8>
__device__ void matmul(const u8* w, const float* x, float* y, int rows, int cols, long long row_bytes,
                       int tokens, int epi) {
    int r0 = blockIdx.x * MV_ROWS;
    int t = blockIdx.y;
    if (r0 >= rows || t >= tokens) return;
    int n = min(MV_ROWS, rows - r0);
    const u8* wr = w + (long long)r0 * row_bytes;
    const float* xt = x + (long long)t * cols;
    float s;
    if constexpr (I8) s = rows_dot_i8<T>(wr, row_bytes, n, xt, cols);
    else s = rows_dot<T>(wr, row_bytes, n, xt, cols);
    if (threadIdx.x < n) put(y + (long long)t * rows + r0 + threadIdx.x, s, epi);
}

// The products of routed experts for decode: pair p (token p / k, its slot p % k) multiplies
// expert ids[p] (rows ids[p]·rows .. +rows of the stacked w) by x row p / k (or row p when
// `x_per_pair`), writing y row p as `epi` says. One block per MV_ROWS rows and pair; no copy of
// expert ids to the host.
template <int T, bool I8>
__device__ void matmul_id(const u8* w, const float* x, float* y, const int* ids, int rows, int cols,
                          long long row_bytes, int pairs, int k, int x_per_pair, int epi) {
    int r0 = blockIdx.x * MV_ROWS;
    int p = blockIdx.y;
    if (r0 >= rows || p >= pairs) return;
    int n = min(MV_ROWS, rows - r0);
    long long e = ids[p];
    const float* xt = x + (long long)(x_per_pair ? p : p / k) * cols;
    const u8* wr = w + (e * rows + r0) * row_bytes;
    float s;
    if constexpr (I8) s = rows_dot_i8<T>(wr, row_bytes, n, xt, cols);
    else s = rows_dot<T>(wr, row_bytes, n, xt, cols);
    if (threadIdx.x < n) put(y + (long long)p * rows + r0 + threadIdx.x, s, epi);
}

#define MATMUL_FAMILY(name, s, T, I8)                                                            \
    extern "C" __global__ void name##s(const u8* w, const float* x, float* y, int rows, int cols,\
                                       long long row_bytes, int tokens, int epi) {             \
        matmul<T, I8>(w, x, y, rows, cols, row_bytes, tokens, epi);                              \
    }                                                                                            \
    extern "C" __global__ void name##s##_id(const u8* w, const float* x, float* y, const int* ids,\
                                            int rows, int cols, long long row_bytes, int pairs, \
                                            int k, int x_per_pair, int epi) {                   \
        matmul_id<T, I8>(w, x, y, ids, rows, cols, row_bytes, pairs, k, x_per_pair, epi);        \
    }
#define MATMUL(s, T) MATMUL_FAMILY(matmul_, s, T, false)
#define MATMUL_I8(s, T) MATMUL_FAMILY(matmul_i8_, s, T, true)

FOR_EACH_TYPE(MATMUL)
FOR_EACH_INT8_TYPE(MATMUL_I8)

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
                             long long row_bytes, int tokens, int epi) {
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
            if (t < tokens) put(y + (long long)t * rows + r, acc[j], epi);
        }
    }
}

#define MATMUL_TILED(s, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) matmul_tiled_##s(const u8* w, const float* x, float* y,\
                                    int rows, int cols, long long row_bytes, int tokens,          \
                                    int epi) {                                                    \
        matmul_tiled<T>(w, x, y, rows, cols, row_bytes, tokens, epi);                            \
    }

FOR_EACH_TYPE(MATMUL_TILED)

// Prefill on the tensor cores (normal precision): bfloat16 operands in shared memory, mma.sync
// m16n8k16 with f32 accumulation (the tile and the pipeline are described at matmul_mma). Rows
// are padded to 40 halves so that the fragment loads of a warp fall in 32 different banks.
#define MMA_WM 4
#define MMA_WN 2
#define MMA_THREADS (32 * MMA_WM * MMA_WN)
#define MMA_ROWS (32 * MMA_WM)
#define MMA_TOKENS (32 * MMA_WN)
#define MMA_K 32
#define MMA_PAD 40

// Two floats as a bf16 pair (lo in the low half), rounded to nearest even.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Tensor-core prefill: a block of MMA_WM × MMA_WN warps computes a tile of MMA_ROWS rows ×
// MMA_TOKENS tokens, each warp 32 × 32 of it as 2 × 4 bf16 mma tiles of 16 × 8 with f32 sums.
// Per step of MMA_K columns the block dequantizes its weight rows (deq8) and converts its
// tokens' activations into bf16 in shared memory; the two buffers alternate, so that the next
// step's loads are issued before this step's products and one barrier per step suffices.
template <int T>
__device__ void matmul_mma(const u8* w, const float* x, float* y, int rows, int cols,
                           long long row_bytes, int tokens, int epi) {
    __shared__ __align__(16) unsigned short ws[2][MMA_ROWS][MMA_PAD];
    __shared__ __align__(16) unsigned short xs[2][MMA_TOKENS][MMA_PAD];
    int tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
    int r0 = blockIdx.x * MMA_ROWS, t0 = blockIdx.y * MMA_TOKENS;
    int wm = (wid / MMA_WN) * 32, wn = (wid % MMA_WN) * 32;
    int gid = lane >> 2, tig = lane & 3;
    float acc[2][4][4];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;
    // Step k0 into buffer `buf`: MMA_ROWS × MMA_K weights and MMA_TOKENS × MMA_K activations,
    // as runs of eight.
    auto stage = [&](int buf, int k0) {
        float v[8];
        for (int i = tid; i < MMA_ROWS * MMA_K / 8; i += MMA_THREADS) {
            int rr = i / (MMA_K / 8), c = (i % (MMA_K / 8)) * 8;
            int r = r0 + rr;
            if (r < rows) {
                deq8<T>(w + (long long)r * row_bytes, k0 + c, v);
            } else {
                for (int j = 0; j < 8; j++) v[j] = 0.0f;
            }
            uint4 p = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                 pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
            *(uint4*)&ws[buf][rr][c] = p;
        }
        for (int i = tid; i < MMA_TOKENS * MMA_K / 8; i += MMA_THREADS) {
            int tt = i / (MMA_K / 8), c = (i % (MMA_K / 8)) * 8;
            int t = t0 + tt;
            if (t < tokens) {
                load_x8(x + (long long)t * cols, k0 + c, v);
            } else {
                for (int j = 0; j < 8; j++) v[j] = 0.0f;
            }
            uint4 p = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                 pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
            *(uint4*)&xs[buf][tt][c] = p;
        }
    };
    stage(0, 0);
    __syncthreads();
    int buf = 0;
    for (int k0 = 0; k0 < cols; k0 += MMA_K) {
        if (k0 + MMA_K < cols) stage(buf ^ 1, k0 + MMA_K);
        for (int kk = 0; kk < MMA_K; kk += 16) {
            u32 a[2][4], b[4][2];
            for (int i = 0; i < 2; i++) {
                int m = wm + 16 * i + gid;
                a[i][0] = *(const u32*)&ws[buf][m][kk + 2 * tig];
                a[i][1] = *(const u32*)&ws[buf][m + 8][kk + 2 * tig];
                a[i][2] = *(const u32*)&ws[buf][m][kk + 8 + 2 * tig];
                a[i][3] = *(const u32*)&ws[buf][m + 8][kk + 8 + 2 * tig];
            }
            for (int j = 0; j < 4; j++) {
                int nn = wn + 8 * j + gid;
                b[j][0] = *(const u32*)&xs[buf][nn][kk + 2 * tig];
                b[j][1] = *(const u32*)&xs[buf][nn][kk + 8 + 2 * tig];
            }
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 4; j++)
                    asm volatile(
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                        : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]),
                          "+f"(acc[i][j][3])
                        : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]),
                          "r"(b[j][1]));
        }
        __syncthreads();
        buf ^= 1;
    }
    // c0, c1: row gid, tokens 2·tig, 2·tig + 1; c2, c3: row gid + 8, the same tokens.
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int c = 0; c < 4; c++) {
                int r = r0 + wm + 16 * i + gid + (c >= 2 ? 8 : 0);
                int t = t0 + wn + 8 * j + 2 * tig + (c & 1);
                if (r < rows && t < tokens) put(y + (long long)t * rows + r, acc[i][j][c], epi);
            }
}

#define MATMUL_MMA(s, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) matmul_mma_##s(const u8* w, const float* x, float* y,\
                                    int rows, int cols, long long row_bytes, int tokens,          \
                                    int epi) {                                                    \
        matmul_mma<T>(w, x, y, rows, cols, row_bytes, tokens, epi);                              \
    }

FOR_EACH_TYPE(MATMUL_MMA)

// The tensor-core product for several groups in one launch (a layer's experts in prefill): group
// z = (first weight row, first activation/output row, tokens) multiplies rows w_row.. of w
// (`rows` of them) by its tokens' activations. Grid: (row tiles, token tiles of the largest
// group, groups); blocks past their group's tokens exit at once, before any barrier.
#define MATMUL_MMA_GROUPED(s, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) matmul_mma_grouped_##s(                    \
        const u8* w, const float* x, float* y, int rows, int cols, long long row_bytes,          \
        const int* groups, int epi) {                                                            \
        const int* g = groups + 3 * blockIdx.z;                                                  \
        int tokens = g[2];                                                                       \
        if ((int)blockIdx.y * MMA_TOKENS >= tokens) return;                                      \
        matmul_mma<T>(w + (long long)g[0] * row_bytes, x + (long long)g[1] * cols,               \
                      y + (long long)g[1] * rows, rows, cols, row_bytes, tokens, epi);           \
    }

FOR_EACH_TYPE(MATMUL_MMA_GROUPED)

// ---------------------------------------------------------------------------------------------
// Mamba-2 on the device (building blocks of the device-resident forward pass).

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Causal depthwise convolution of `t` rows of xBC (t × ch) with per-channel kernels w (ch × k)
// and an optional bias, then SiLU; `state` holds the previous k − 1 inputs (rows, oldest first).
// One thread per (channel, token): each output sums its k inputs oldest first, those before the
// first row coming from `state`. mamba_conv_state then leaves the last k − 1 inputs there.
extern "C" __global__ void mamba_conv(const float* x, const float* state, const float* w,
                                      const float* bias, float* out, int t, int ch, int k) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= ch || k < 1 || k > 8) return;
    for (int ti = blockIdx.y; ti < t; ti += gridDim.y) {
        float acc = 0.0f;
        for (int j = 0; j < k; j++) {
            int src = ti - (k - 1) + j;
            float v = src >= 0 ? x[(long long)src * ch + c]
                               : state[(long long)(k - 1 + src) * ch + c];
            acc = fmaf(v, w[c * k + j], acc);
        }
        if (bias) acc += bias[c];
        out[(long long)ti * ch + c] = silu(acc);
    }
}

// The conv state after `t` more rows of x: the last k − 1 inputs, oldest first.
extern "C" __global__ void mamba_conv_state(const float* x, float* state, int t, int ch, int k) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= ch || k < 2 || k > 8) return;
    float win[7];
    for (int j = 0; j < k - 1; j++) {
        int src = t - (k - 1) + j;
        win[j] = src >= 0 ? x[(long long)src * ch + c] : state[(long long)(k - 1 + src) * ch + c];
    }
    for (int j = 0; j < k - 1; j++) state[(long long)j * ch + c] = win[j];
}

// The selective scan. One warp per row i of head h (blocks of SCAN_ROWS warps, consecutive rows
// of one head); lane l owns state elements l, l + 32, … (d_state ≤ 256). Per token:
// s = s·exp(dt·a_h) + x·dt·B_g[n], y = Σ_n s·C_g[n] + x·D_h (B and C of the head's group g),
// the sum by warp shuffles: no block barrier in the token loop. xbc is the conv output
// (t × ch: x | B | C), dt the softplus-ed steps (t × n_head), y is t × d_inner, ssm is
// n_head × head_dim × d_state.
#define SCAN_ROWS 4
extern "C" __global__ void mamba_scan(const float* xbc, const float* dt, const float* a,
                                      const float* d, float* ssm, float* y, int t, int d_inner,
                                      int d_state, int n_head, int n_group) {
    int lane = threadIdx.x % 32, h = blockIdx.y;
    int i = blockIdx.x * SCAN_ROWS + threadIdx.x / 32;
    int hd = d_inner / n_head, g = h / (n_head / n_group);
    if (i >= hd || d_state > 256) return;  // whole warps
    int ch = d_inner + 2 * n_group * d_state;
    const float* bs = xbc + d_inner + g * d_state;
    const float* cs = xbc + d_inner + n_group * d_state + g * d_state;
    float* st = ssm + ((long long)h * hd + i) * d_state;
    float s[8];
    for (int j = 0; j < 8; j++) {
        int n = lane + 32 * j;
        s[j] = n < d_state ? st[n] : 0.0f;
    }
    float ah = a[h], dh = d[h];
    for (int ti = 0; ti < t; ti++) {
        long long off = (long long)ti * ch;
        float x = xbc[off + h * hd + i];
        float dth = dt[ti * n_head + h];
        float da = expf(dth * ah);
        float xd = x * dth;
        float contrib = 0.0f;
        for (int j = 0; j < 8; j++) {
            int n = lane + 32 * j;
            if (n < d_state) {
                s[j] = fmaf(s[j], da, xd * bs[off + n]);
                contrib = fmaf(s[j], cs[off + n], contrib);
            }
        }
        contrib = warp_sum(contrib);
        if (lane == 0) y[(long long)ti * d_inner + h * hd + i] = contrib + x * dh;
    }
    for (int j = 0; j < 8; j++) {
        int n = lane + 32 * j;
        if (n < d_state) st[n] = s[j];
    }
}

// ---------------------------------------------------------------------------------------------
// The rest of a layer on the device: norms, the Mamba-2 glue, attention, MoE routing and the
// gather / combine around the routed experts.

// Sum over a block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_sum(v);
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) part[wid] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i < (int)(blockDim.x + 31) / 32; i++) s += part[i];
        total = s;
    }
    __syncthreads();
    return total;
}

// y[t] = x[t] · w / sqrt(mean(x[t]²) + eps) for n-wide rows, one block per row (y may be x).
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int n, float eps) {
    const float* xr = x + (long long)blockIdx.x * n;
    float* yr = y + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s = fmaf(xr[i], xr[i], s);
    float inv = rsqrtf(block_sum(s) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = (xr[i] * inv) * w[i];
}

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Splits the Mamba input projection zx (t × width: z | xBC | dt) into xBC (t × ch) and the
// step sizes dt = softplus(dt + dt_bias) (t × nh).
extern "C" __global__ void mamba_split(const float* zx, const float* dt_bias, float* xbc, float* dt,
                                       int t, int width, int di, int ch, int nh) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per = ch + nh;
    if (i >= (long long)t * per) return;
    int ti = i / per, c = i % per;
    const float* row = zx + (long long)ti * width;
    if (c < ch) {
        xbc[(long long)ti * ch + c] = row[di + c];
    } else {
        int h = c - ch;
        dt[ti * nh + h] = softplus(row[di + ch + h] + dt_bias[h]);
    }
}

// Mamba-2's output gate and grouped norm, in place on y (t × di): y ·= SiLU(z), then RMSNorm
// over each group of gs values with weights norm. Block (group, token).
extern "C" __global__ void mamba_gate_norm(float* y, const float* zx, const float* norm, int di,
                                           int width, int gs, float eps) {
    int g = blockIdx.x, ti = blockIdx.y;
    float* yr = y + (long long)ti * di + g * gs;
    const float* z = zx + (long long)ti * width + g * gs;
    float s = 0.0f;
    for (int i = threadIdx.x; i < gs; i += blockDim.x) {
        float v = yr[i] * silu(z[i]);
        yr[i] = v;
        s = fmaf(v, v, s);
    }
    float inv = rsqrtf(block_sum(s) / (float)gs + eps);
    for (int i = threadIdx.x; i < gs; i += blockDim.x) yr[i] = (yr[i] * inv) * norm[g * gs + i];
}

// Causal attention for the `t` new tokens at positions past..past+t−1 over the cached K and V
// (rows of n_kv·hd, positions 0..past+t−1 already stored). Block (head, token) of ATT_WARPS
// warps: warp w takes positions w, w + ATT_WARPS, ... with an online softmax, each lane holding
// hd / 32 dimensions; the warps' partial results are merged at the end.
// The K and V rows of `t` new positions (n = t · row floats each) into the caches at position
// *pastp: the position is read on the device, so that a captured decode step (a CUDA graph)
// replays at every position.
extern "C" __global__ void kv_store(const float* kn, const float* vn, float* kc, float* vc,
                                    const int* pastp, int row, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long at = (long long)(*pastp) * row + i;
    kc[at] = kn[i];
    vc[at] = vn[i];
}

#define ATT_WARPS 4
// Block (head, token) of ATT_WARPS warps over the positions the token sees: all before it and
// itself, or the last `window` of them (window 0: no window). Lane j of a warp holds dimensions
// j, j + 32, ... (head dims up to 256). `sinks` (null: none): one logit per head that joins the
// softmax's maximum and denominator without a value row (gpt-oss).
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)
    attention(const float* q, const float* kc, const float* vc, float* out, const int* pastp,
              int nh, int nkv, int hd, float scale, int window, const float* sinks) {
    int past = *pastp;
    __shared__ float acc_s[ATT_WARPS][256];
    __shared__ float m_s[ATT_WARPS], l_s[ATT_WARPS];
    int h = blockIdx.x, ti = blockIdx.y;
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    int per = (hd + 31) / 32, kvh = h / (nh / nkv), row = nkv * hd;
    int end = past + ti + 1;
    int first = (window > 0 && end > window) ? end - window : 0;
    const float* qh = q + ((long long)ti * nh + h) * hd;
    float qv[8], acc[8];
    for (int j = 0; j < per; j++) {
        int d = lane + 32 * j;
        qv[j] = d < hd ? qh[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p = first + wid; p < end; p += ATT_WARPS) {
        const float* kr = kc + (long long)p * row + kvh * hd;
        float s = 0.0f;
        for (int j = 0; j < per; j++) {
            int d = lane + 32 * j;
            if (d < hd) s = fmaf(qv[j], kr[d], s);
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), e = expf(s - mn);
        l = l * corr + e;
        const float* vr = vc + (long long)p * row + kvh * hd;
        for (int j = 0; j < per; j++) {
            int d = lane + 32 * j;
            acc[j] = fmaf(acc[j], corr, d < hd ? e * vr[d] : 0.0f);
        }
        m = mn;
    }
    for (int j = 0; j < per; j++) {
        int d = lane + 32 * j;
        if (d < hd) acc_s[wid][d] = acc[j];
    }
    if (lane == 0) {
        m_s[wid] = m;
        l_s[wid] = l;
    }
    __syncthreads();
    float mx = sinks ? sinks[h] : NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, m_s[w]);
    float lsum = sinks ? expf(sinks[h] - mx) : 0.0f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = l_s[w] > 0.0f ? expf(m_s[w] - mx) : 0.0f;
        lsum += l_s[w] * f[w];
    }
    float* o = out + ((long long)ti * nh + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) v = fmaf(acc_s[w][d], f[w], v);
        o[d] = v / lsum;
    }
}

// MoE routing, one warp per token. `gating` 0: the k experts with the highest
// sigmoid(logit) + bias (Nemotron-H), weighted by sigmoid(logit); 1: the top k of the softmax
// over all experts, weighted by their probabilities (qwen3moe); 2: the top k logits, weighted by
// a softmax over those k (gpt-oss). Ties go to the lower index. With `norm` the weights are
// divided by their sum (floored at 2^-14); all are multiplied by `scale`. Writes ids and weights
// (t × k) and counts each selection in `counts`. `bias` is read by gating 0 only.
extern "C" __global__ void route_topk(const float* logits, const float* bias, int* ids, float* wts,
                                      unsigned int* counts, int ne, int k, int norm, float scale,
                                      int gating) {
    __shared__ float sel[1024];
    __shared__ float prob[1024];
    int ti = blockIdx.x, lane = threadIdx.x;
    const float* lr = logits + (long long)ti * ne;
    if (gating == 1) {
        float mx = NEG_INF;
        for (int e = lane; e < ne; e += 32) mx = fmaxf(mx, lr[e]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float s = 0.0f;
        for (int e = lane; e < ne; e += 32) s += expf(lr[e] - mx);
        s = warp_sum(s);
        for (int e = lane; e < ne; e += 32) {
            float p = expf(lr[e] - mx) / s;
            prob[e] = p;
            sel[e] = p;
        }
    } else {
        for (int e = lane; e < ne; e += 32) {
            float p = gating == 0 ? 1.0f / (1.0f + expf(-lr[e])) : lr[e];
            prob[e] = p;
            sel[e] = gating == 0 ? p + bias[e] : p;
        }
    }
    __syncwarp();
    float sum = 0.0f;
    for (int r = 0; r < k; r++) {
        float best = NEG_INF;
        int bi = 0x7fffffff;
        for (int e = lane; e < ne; e += 32) {
            float v = sel[e];
            if (v > best || (v == best && e < bi)) {
                best = v;
                bi = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ob > best || (ob == best && oi < bi)) {
                best = ob;
                bi = oi;
            }
        }
        if (lane == 0) {
            ids[ti * k + r] = bi;
            wts[ti * k + r] = prob[bi];
            atomicAdd(&counts[bi], 1u);
            sel[bi] = NEG_INF;
        }
        sum += prob[bi];
        __syncwarp();
    }
    if (gating == 2) {
        // The first selected logit is the largest.
        float w = 0.0f, top = wts[ti * k], s = 0.0f;
        for (int r = 0; r < k; r++) s += expf(wts[ti * k + r] - top);
        if (lane < k) w = expf(wts[ti * k + lane] - top) / s;
        __syncwarp();
        if (lane < k) wts[ti * k + lane] = w * scale;
        return;
    }
    if (lane < k) {
        float w = wts[ti * k + lane];
        if (norm) w /= fmaxf(sum, 6.103515625e-5f);
        wts[ti * k + lane] = w * scale;
    }
}

// out[i] = x[idx[i]] for rows of n floats.
extern "C" __global__ void gather_rows(const float* x, const int* idx, float* out, int rows, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n) return;
    int r = i / n, c = i % n;
    out[i] = x[(long long)idx[r] * n + c];
}

// x[t] += Σ_s wts[t·k + s] · y[pos[t·k + s]] (pos null: y row t·k + s) for n-wide rows; a
// position outside y's `y_rows` rows is skipped.
extern "C" __global__ void moe_combine(const float* y, const int* pos, const float* wts, float* x,
                                       int t, int k, int n, int y_rows) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)t * n) return;
    int ti = i / n, c = i % n;
    float acc = x[i];
    for (int s = 0; s < k; s++) {
        int p = ti * k + s;
        long long r = pos ? pos[p] : p;
        if (r >= 0 && r < y_rows) acc = fmaf(wts[p], y[r * n + c], acc);
    }
    x[i] = acc;
}

// x += y over n values.
extern "C" __global__ void add(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// Rotates the first n_rot dims of each head (nh heads of hd a row, t rows) by the (cos, sin)
// pairs of its row in cs (t × n_rot/2 pairs, computed on the host as the CPU does): pairs
// (i, i + n_rot/2) in neox order, else (2i, 2i + 1). Rounded products, as the CPU's.
extern "C" __global__ void rope(float* x, const float* cs, int t, int nh, int hd, int n_rot,
                                int neox) {
    int half = n_rot / 2;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)t * nh * half) return;
    int p = i % half;
    long long rh = i / half;
    int h = rh % nh;
    long long r = rh / nh;
    float c = cs[(r * half + p) * 2], s = cs[(r * half + p) * 2 + 1];
    float* head = x + (r * nh + h) * hd;
    int ia = neox ? p : 2 * p, ib = neox ? p + half : 2 * p + 1;
    float a = head[ia], b = head[ib];
    head[ia] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    head[ib] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

// y[r] += b[ids[r]] for rows of n (ids null: the one row b).
extern "C" __global__ void add_bias(float* y, const float* b, const int* ids, int rows, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n) return;
    int r = i / n, c = i % n;
    y[i] += b[(long long)(ids ? ids[r] : 0) * n + c];
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978846f * x * (1.0f + 0.044715f * x * x)));
}

// g = act(g) · u over n values: 0 SiLU, 1 GELU (tanh), 2 gpt-oss's clamped SwiGLU (gate
// clamped above at limit, up to ±limit, gate·σ(α·gate)·(up + 1)).
extern "C" __global__ void gated_act(float* g, const float* u, long long n, int act, float alpha,
                                     float limit) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = g[i], y = u[i];
    if (act == 0) {
        g[i] = silu(x) * y;
    } else if (act == 1) {
        g[i] = gelu_tanh(x) * y;
    } else {
        x = fminf(x, limit);
        y = fminf(fmaxf(y, -limit), limit);
        g[i] = x / (1.0f + expf(-alpha * x)) * (y + 1.0f);
    }
}

// x = c · tanh(x / c) over n values (logit soft-capping).
extern "C" __global__ void softcap(float* x, long long n, float c) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = c * tanhf(x[i] / c);
}
