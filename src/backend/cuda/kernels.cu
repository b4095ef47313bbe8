// ggrun's CUDA kernels, compiled by NVRTC on first use (backend/cuda/mod.rs caches the PTX per GPU
// architecture; it puts the grid i-quants' tables, iq2xxs_grid and the others, in front of this
// file as device arrays generated from ggrun_quants::iq_tables). Weights stay in their GGUF block layout on the device; every kernel here reads
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
    X(iq4_xs, T_IQ4_XS) \
    X(mxfp4, T_MXFP4) \
    X(q2_k, T_Q2_K) \
    X(q3_k, T_Q3_K) \
    X(q4_k, T_Q4_K) \
    X(q5_k, T_Q5_K) \
    X(q6_k, T_Q6_K) \
    FOR_EACH_GRID_TYPE(X)

// The grid i-quants (ggrun_quants::iq_grid).
#define FOR_EACH_GRID_TYPE(X) \
    X(iq2_xxs, T_IQ2_XXS) \
    X(iq2_xs, T_IQ2_XS) \
    X(iq2_s, T_IQ2_S) \
    X(iq3_xxs, T_IQ3_XXS) \
    X(iq3_s, T_IQ3_S) \
    X(iq1_s, T_IQ1_S) \
    X(iq1_m, T_IQ1_M)

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
#define T_IQ2_XXS 16
#define T_IQ2_XS 17
#define T_IQ3_XXS 18
#define T_IQ1_S 19
#define T_IQ4_NL 20
#define T_IQ3_S 21
#define T_IQ2_S 22
#define T_IQ4_XS 23
#define T_IQ1_M 29
#define T_BF16 30
#define T_MXFP4 39

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// An f16 at a 2-byte aligned address (every f16 field of the block types is one).
__device__ __forceinline__ float f16at(const u8* p) { return half_to_float(*(const u16*)p); }

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

// A 16-entry table of signed bytes applied to four nibbles (one a byte, 0..15): both halves
// (entries 0..7 in lo0/lo1, 8..15 in hi0/hi1) permuted by the nibbles' low three bits, each
// byte taken from the half its bit 3 names.
__device__ __forceinline__ int values4(int w, u32 lo0, u32 lo1, u32 hi0, u32 hi1) {
    u32 sel = (w & 7) | ((w >> 4) & 0x70) | ((w >> 8) & 0x700) | ((w >> 12) & 0x7000);
    u32 lo = __byte_perm(lo0, lo1, sel);
    u32 hi = __byte_perm(hi0, hi1, sel);
    u32 m = (((u32)w >> 3) & 0x01010101u) * 0xFFu;
    return (int)((hi & m) | (lo & ~m));
}

// IQ4_NL's values of four nibbles as four signed bytes.
__device__ __forceinline__ int iq4nl_values4(int w) {
    return values4(w, 0xBFAD9881u, 0xF6EADDCFu, 0x26190D01u, 0x71594535u);
}

// IQ4_XS's signed 6-bit scale of sub-block ib (0..8) of the super-block at b.
__device__ __forceinline__ int iq4xs_scale(const u8* b, int ib) {
    int lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 15;
    int hi = ((b[2] | (b[3] << 8)) >> (2 * ib)) & 3;
    return (lo | (hi << 4)) - 32;
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
// Twice the E2M1 values of four nibbles as four signed bytes.
__device__ __forceinline__ int fp4_values4(int w) {
    return values4(w, 0x03020100u, 0x0C080604u, 0xFDFEFF00u, 0xF4F8FAFCu);
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

// Bits 0..3 of b moved to bit 0 of bytes 0..3.
__device__ __forceinline__ int spread4(u32 b) {
    return (int)((b & 1) | ((b & 2) << 7) | ((b & 4) << 14) | ((b & 8) << 21));
}

// Bytes and elements of a block of type T, and whether its values carry an offset.
template <int T> struct Block32 {
    static const int elems = T == T_Q2_K || T == T_Q3_K || T == T_Q4_K || T == T_Q5_K || T == T_Q6_K
                             || T == T_IQ4_XS || T == T_IQ2_XXS || T == T_IQ2_XS || T == T_IQ2_S
                             || T == T_IQ3_XXS || T == T_IQ3_S || T == T_IQ1_S || T == T_IQ1_M ? 256 : 32;
    static const int bytes = T == T_Q8_0 ? 34 : T == T_Q4_0 ? 18 : T == T_Q4_1 ? 20 : T == T_Q5_0 ? 22
                           : T == T_Q5_1 ? 24 : T == T_Q2_K ? 84 : T == T_Q3_K ? 110 : T == T_Q4_K ? 144
                           : T == T_Q5_K ? 176 : T == T_IQ4_XS ? 136 : T == T_MXFP4 ? 17
                           : T == T_IQ2_XXS ? 66 : T == T_IQ2_XS ? 74 : T == T_IQ2_S ? 82
                           : T == T_IQ3_XXS ? 98 : T == T_IQ3_S ? 110 : T == T_IQ1_S ? 50
                           : T == T_IQ1_M ? 56 : 210;
    static const int has_min = T == T_Q4_1 || T == T_Q5_1 || T == T_Q2_K || T == T_Q4_K || T == T_Q5_K;
};

// The grid i-quants: super-blocks of 256 weights in groups of eight, each group a grid row's
// magnitudes (IQ3: two rows of four) with a sign per weight under an odd scale, or (IQ1) a row
// of -1/0/1 with an offset of ±1/8. Field offsets as the block structs of ggrun_quants::iq_grid.
__device__ __forceinline__ bool is_grid(int T) {
    return T == T_IQ2_XXS || T == T_IQ2_XS || T == T_IQ2_S || T == T_IQ3_XXS || T == T_IQ3_S
        || T == T_IQ1_S || T == T_IQ1_M;
}

// A KSIGNS entry computed: seven sign bits and an eighth that makes the count of set bits even.
__device__ __forceinline__ u32 ksigns(u32 i) { return i | ((__popc(i) & 1) << 7); }

// Four bytes at a 2-byte aligned address (every quant field the block types have is one).
__device__ __forceinline__ int ld_a2(const u8* p) {
    const u16* q = (const u16*)p;
    return (int)((u32)q[0] | ((u32)q[1] << 16));
}

// Group k (weights 8k..8k+8) of the IQ2/IQ3 super-block at b: the eight magnitudes as two words
// of bytes, the sign byte (bit j: weight j negative) and the odd scale (2s + 1; IQ3_S: 1 + 2s).
template <int T>
__device__ __forceinline__ void grid_group(const u8* b, int k, u32* g, u32* signs, int* odd) {
    if (T == T_IQ2_XXS) {
        // d, then per 32 weights four grid rows and a u32 of four 7-bit signs and the scale.
        const u8* q = b + 2 + 8 * (k / 4);
        u32 aux = (u32)ld_a2(q + 4);
        unsigned long long r = iq2xxs_grid[q[k % 4]];
        g[0] = (u32)r;
        g[1] = (u32)(r >> 32);
        *signs = ksigns((aux >> (7 * (k % 4))) & 127);
        *odd = 2 * (int)(aux >> 28) + 1;
    } else if (T == T_IQ2_XS) {
        // d, 32 u16 (row in the low nine bits, signs in the high seven), sixteen scale nibbles.
        u32 v = *(const u16*)(b + 2 + 2 * k);
        unsigned long long r = iq2xs_grid[v & 511];
        g[0] = (u32)r;
        g[1] = (u32)(r >> 32);
        *signs = ksigns(v >> 9);
        *odd = 2 * ((b[66 + k / 4] >> (4 * ((k / 2) % 2))) & 15) + 1;
    } else if (T == T_IQ2_S) {
        // d, 32 low row bytes, 32 sign bytes, the rows' high two bits, sixteen scale nibbles.
        int idx = b[2 + k] | (((b[66 + k / 4] >> (2 * (k % 4))) & 3) << 8);
        unsigned long long r = iq2s_grid[idx];
        g[0] = (u32)r;
        g[1] = (u32)(r >> 32);
        *signs = b[34 + k];
        *odd = 2 * ((b[74 + k / 4] >> (4 * ((k / 2) % 2))) & 15) + 1;
    } else if (T == T_IQ3_XXS) {
        // d, 64 rows of four, per 32 weights a u32 of four 7-bit signs and the scale.
        g[0] = iq3xxs_grid[b[2 + 2 * k]];
        g[1] = iq3xxs_grid[b[3 + 2 * k]];
        u32 aux = (u32)ld_a2(b + 66 + 4 * (k / 4));
        *signs = ksigns((aux >> (7 * (k % 4))) & 127);
        *odd = 2 * (int)(aux >> 28) + 1;
    } else {
        // IQ3_S: d, 64 low row bytes, their ninth bits, 32 sign bytes, eight scale nibbles.
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = 2 * k + h;
            g[h] = iq3s_grid[b[2 + r] | (((b[66 + r / 8] >> (r % 8)) & 1) << 8)];
        }
        *signs = b[74 + k];
        *odd = 1 + 2 * ((b[106 + k / 8] >> (4 * ((k / 4) % 2))) & 15);
    }
}

// Group k of the IQ1 super-block at b: the row's eight values (-1, 0, 1 as signed bytes), the
// offset's sign (±1), the odd scale 2s + 1 and the super-block's scale d.
template <int T>
__device__ __forceinline__ void iq1_group(const u8* b, int k, u32* g, int* delta, int* odd,
                                          float* d) {
    int idx;
    if (T == T_IQ1_S) {
        // d, 32 low row bytes, per 32 weights a u16: four high-bit triples, the scale, the sign.
        *d = f16at(b);
        u32 qh = *(const u16*)(b + 34 + 2 * (k / 4));
        idx = b[2 + k] | (((qh >> (3 * (k % 4))) & 7) << 8);
        *delta = qh & 0x8000 ? -1 : 1;
        *odd = 2 * (int)((qh >> 12) & 7) + 1;
    } else {
        // IQ1_M: 32 low row bytes, a nibble per row (high bits, offset sign), four u16 of
        // sixteen 3-bit scales whose top nibbles make the f16 super-block scale.
        const u16* sc = (const u16*)(b + 48);
        u32 bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
        *d = half_to_float((u16)bits);
        int nib = (b[32 + k / 2] >> (4 * (k % 2))) & 15;
        idx = b[k] | ((nib & 7) << 8);
        *delta = nib & 8 ? -1 : 1;
        int m = k / 2;
        *odd = 2 * ((sc[m / 4] >> (3 * (m % 4))) & 7) + 1;
    }
    unsigned long long r = iq1s_grid[idx];
    g[0] = (u32)r;
    g[1] = (u32)(r >> 32);
}

// Elements j..j+7 (j a multiple of 8) of a grid super-block as floats, computed as
// ggrun_quants' dequantizers do: IQ2 d·(0.5 + s)·¼, IQ3_XXS d·(0.5 + s)·½, IQ3_S d·(1 + 2s),
// times magnitude and sign; IQ1 d·(2s + 1)·(value ± ⅛).
template <int T>
__device__ __forceinline__ void deq8_grid(const u8* b, int j, float* w) {
    u32 g[2];
    if (T == T_IQ1_S || T == T_IQ1_M) {
        int delta, odd;
        float d;
        iq1_group<T>(b, j / 8, g, &delta, &odd, &d);
        float dl = d * (float)odd, off = (float)delta * 0.125f;
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = dl * ((float)(i8)(g[i / 4] >> (8 * (i % 4))) + off);
        return;
    }
    u32 signs;
    int odd;
    grid_group<T>(b, j / 8, g, &signs, &odd);
    float d = f16at(b), s = (float)((odd - 1) / 2);
    float dl = T == T_IQ3_S ? d * (float)odd
             : T == T_IQ3_XXS ? d * (0.5f + s) * 0.5f : d * (0.5f + s) * 0.25f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float v = dl * (float)((g[i / 4] >> (8 * (i % 4))) & 0xff);
        w[i] = (signs >> i) & 1 ? -v : v;
    }
}

// The same elements as signed bytes q with their scale d (value = d · q): IQ2/IQ3 the signed
// magnitudes (at most 62) under d·(2s + 1)·(⅛, ¼ or 1); IQ1 8·value ± 1 under d·(2s + 1)·⅛.
template <int T>
__device__ __forceinline__ void grid_ints(const u8* b, int j, int* w, float* d) {
    u32 g[2];
    if (T == T_IQ1_S || T == T_IQ1_M) {
        int delta, odd;
        float dsup;
        iq1_group<T>(b, j / 8, g, &delta, &odd, &dsup);
        *d = dsup * (float)odd * 0.125f;
        u32 off = delta > 0 ? 0x01010101u : 0xFFFFFFFFu;
#pragma unroll
        for (int h = 0; h < 2; h++) w[h] = (int)__vadd4((g[h] << 3) & 0xF8F8F8F8u, off);
        return;
    }
    u32 signs;
    int odd;
    grid_group<T>(b, j / 8, g, &signs, &odd);
    const float factor = T == T_IQ3_S ? 1.0f : T == T_IQ3_XXS ? 0.25f : 0.125f;
    *d = f16at(b) * (float)odd * factor;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        // 0xFF in the bytes whose sign bit is set: (g ^ m) − m negates exactly those.
        u32 m = (u32)spread4((signs >> (4 * h)) & 15) * 0xFFu;
        w[h] = (int)__vsub4(g[h] ^ m, m);
    }
}

// Elements e0..e0+7 (e0 a multiple of 8) of a row of type T.
template <int T>
__device__ __forceinline__ void deq8(const u8* row, int e0, float* w) {
    if (is_grid(T)) {
        deq8_grid<T>(row + (e0 / 256) * Block32<T>::bytes, e0 % 256, w);
    } else if (T == T_F32) {
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
    } else if (T == T_IQ4_XS) {
        // 136 bytes per 256: d, the scales' high bits (u16), their low nibbles (4 bytes), and
        // per sub-block of 32 sixteen bytes (element j low nibble of byte j, j + 16 high).
        const u8* b = row + (e0 / 256) * 136;
        int e = e0 % 256, ib = e / 32, j = e % 32;
        float dl = f16at(b) * (float)iq4xs_scale(b, ib);
        const u8* q = b + 8 + 16 * ib;
        for (int i = 0; i < 8; i++) {
            int k = j + i;
            int n = k < 16 ? (q[k] & 15) : (q[k - 16] >> 4);
            w[i] = dl * (float)iq4nl_value(n);
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

// The activations (SiLU; GELU, tanh approximation).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978846f * x * (1.0f + 0.044715f * x * x)));
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

// The decode kernels: a block of MV_WARPS warps computes MV_ROWS rows for NT tokens (1, or
// MV_TOKENS for batches of several sequences' steps, so that the weights are read once for
// them). Warp w takes the 256-element chunks w, w + MV_WARPS, ... of the rows, each lane eight
// consecutive elements of a chunk; the rows share each load of the activations, the tokens each
// load of the weights, and every load is unconditional (a chunk past the end reads the first
// one and is not summed; a token past the batch reads the first token and is not stored), so
// the loads of all MV_ROWS rows are in flight together. Partial sums meet in shared memory. A
// token's sums are formed in the same order whatever its companions, so its results are those
// of a one-token block bit for bit.
#define MV_WARPS 4
#define MV_ROWS 2
#define MV_TOKENS 4

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

// The block's per-warp partial sums acc[token][row] of R rows meet in shared memory: thread
// i < NT·R returns the total of token i / R, row i % R (the others 0).
template <int NT, int R>
__device__ __forceinline__ float rows_total(float (*acc)[R]) {
    __shared__ float part[MV_WARPS][NT * R];
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
#pragma unroll
    for (int tt = 0; tt < NT; tt++) {
#pragma unroll
        for (int j = 0; j < R; j++) {
            float s = warp_sum(acc[tt][j]);
            if (lane == 0) part[wid][tt * R + j] = s;
        }
    }
    __syncthreads();
    float sum = 0.0f;
    if (threadIdx.x < NT * R) {
        for (int i = 0; i < MV_WARPS; i++) sum += part[i][threadIdx.x];
    }
    return sum;
}

// The R row pointers of a decode block: the first `n` (≤ MV_ROWS) rows at w + j·row_bytes, and
// with R = 2·MV_ROWS the same rows at w2 after them (a gate's rows, then up's); rows past n
// read row 0 and are not stored.
template <int R>
__device__ __forceinline__ void row_pointers(const u8* w, const u8* w2, long long row_bytes, int n,
                                             const u8** rowp) {
#pragma unroll
    for (int j = 0; j < R; j++) {
        int r = j % MV_ROWS;
        rowp[j] = (j < MV_ROWS ? w : w2) + (r < n ? r : 0) * row_bytes;
    }
}

// Σ_c row_j[c] · x_t[c] for the R rows (row_pointers) and the first `nt` (≤ NT) of the
// activation rows at x + t·cols, by the whole block; returns as rows_total.
template <int T, int NT, int R>
__device__ __forceinline__ float rows_dot(const u8* w, const u8* w2, long long row_bytes, int n,
                                          const float* x, int cols, int nt) {
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    float acc[NT][R] = {};
    const u8* rowp[R];
    row_pointers<R>(w, w2, row_bytes, n, rowp);
    float v[8], xv[NT][8];
    for (int base = wid * 256; base < cols; base += 256 * MV_WARPS) {
        int e0 = base + 8 * lane;
        bool ok = e0 < cols;
        int e = ok ? e0 : 0;
#pragma unroll
        for (int tt = 0; tt < NT; tt++) load_x8(x + (long long)(tt < nt ? tt : 0) * cols, e, xv[tt]);
#pragma unroll
        for (int j = 0; j < R; j++) {
            deq8<T>(rowp[j], e, v);
            if (ok) {
#pragma unroll
                for (int tt = 0; tt < NT; tt++) {
                    for (int i = 0; i < 8; i++) acc[tt][j] = fmaf(v[i], xv[tt][i], acc[tt][j]);
                }
            }
        }
    }
    return rows_total<NT, R>(acc);
}

// Decode with int8 activations (normal precision), for the legacy, K-quant, IQ4_XS and MXFP4
// types: the activations are quantized against the absolute maximum of each block of 32, as
// llama.cpp's q8_1 does, once per product (quantize_q8), and each lane multiplies its eight
// with the weights' integers four at a time (dp4a) instead of converting every weight to float.
// A lane's eight weights are d · q + m with one scale d and offset m (a K-quant's sub-block
// scale and minimum folded in), so its share is d · dx · Σ q·xq + m · Σ x.
#define FOR_EACH_INT8_TYPE(X) \
    X(q4_0, T_Q4_0) \
    X(q4_1, T_Q4_1) \
    X(q5_0, T_Q5_0) \
    X(q5_1, T_Q5_1) \
    X(q8_0, T_Q8_0) \
    X(iq4_xs, T_IQ4_XS) \
    X(mxfp4, T_MXFP4) \
    X(q2_k, T_Q2_K) \
    X(q3_k, T_Q3_K) \
    X(q4_k, T_Q4_K) \
    X(q5_k, T_Q5_K) \
    X(q6_k, T_Q6_K) \
    FOR_EACH_GRID_TYPE(X)

// Eight bytes at any address as two words, by aligned 4-byte loads and funnel shifts (blocks
// of 17, 18, 22 or 34 bytes leave most fields unaligned; byte or 2-byte loads cost a load
// instruction per byte or two). The third load holds byte p + 7, so it stays within the
// allocation; where p is aligned it repeats the second.
__device__ __forceinline__ void ld8(const u8* p, int* w) {
    unsigned long long a = (unsigned long long)p;
    u32 s = 8 * (u32)(a & 3);
    const u32* q = (const u32*)(a & ~3ull);
    u32 a0 = q[0], a1 = q[1], a2 = q[s ? 2 : 1];
    w[0] = (int)__funnelshift_r(a0, a1, s);
    w[1] = (int)__funnelshift_r(a1, a2, s);
}

// Elements j..j+7 (j a multiple of 8) of the block at b as two words of four signed bytes q,
// with their scale d and offset m: value = d · q + m.
template <int T>
__device__ __forceinline__ void block_ints(const u8* b, int j, int* w, float* d, float* m) {
    if (is_grid(T)) {
        grid_ints<T>(b, j, w, d);
        *m = 0.0f;
        return;
    }
    if (T == T_MXFP4) {
        // Twice the E2M1 values, so half the block's power of two (the values are exact).
        *d = e8m0_half(b[0]);
        *m = 0.0f;
        int shift = j >= 16 ? 4 : 0, q[2];
        ld8(b + 1 + (j & 15), q);
        w[0] = fp4_values4((q[0] >> shift) & 0x0F0F0F0F);
        w[1] = fp4_values4((q[1] >> shift) & 0x0F0F0F0F);
        return;
    }
    if (T == T_IQ4_XS) {
        int ib = j / 32, l = j % 32;
        *d = f16at(b) * (float)iq4xs_scale(b, ib);
        *m = 0.0f;
        int shift = l >= 16 ? 4 : 0, q[2];
        ld8(b + 8 + 16 * ib + (l & 15), q);
        w[0] = iq4nl_values4((q[0] >> shift) & 0x0F0F0F0F);
        w[1] = iq4nl_values4((q[1] >> shift) & 0x0F0F0F0F);
        return;
    }
    if (T == T_Q4_K || T == T_Q5_K) {
        // Sub-block j / 32 of 64-element pairs c: low nibbles, then high; Q5_K's fifth bits
        // in qh bit 2c + hi of each element's byte.
        int c = j / 64, hi = (j % 64) >= 32, l = j % 32, sc, mn;
        scale_min_k4(j / 32, b + 4, &sc, &mn);
        *d = f16at(b) * (float)sc;
        *m = -f16at(b + 2) * (float)mn;
        int shift = hi ? 4 : 0, q[2];
        ld8(b + (T == T_Q4_K ? 16 : 48) + 32 * c + l, q);
        int lo = (q[0] >> shift) & 0x0F0F0F0F, up = (q[1] >> shift) & 0x0F0F0F0F;
        if (T == T_Q5_K) {
            int bit = 2 * c + hi, h[2];
            ld8(b + 16 + l, h);
            lo |= ((h[0] >> bit) & 0x01010101) << 4;
            up |= ((h[1] >> bit) & 0x01010101) << 4;
        }
        w[0] = lo;
        w[1] = up;
        return;
    }
    if (T == T_Q6_K) {
        int half = j / 128, quarter = (j % 128) / 32, l = j % 32;
        *d = f16at(b + 208) * (float)(i8)b[192 + j / 16];
        *m = 0.0f;
        int ql[2], qh[2];
        ld8(b + 64 * half + (quarter & 1 ? 32 : 0) + l, ql);
        ld8(b + 128 + 32 * half + l, qh);
        int shift = quarter & 2 ? 4 : 0;
        for (int h = 0; h < 2; h++) {
            int lo = (ql[h] >> shift) & 0x0F0F0F0F;
            int hb = ((qh[h] >> (2 * quarter)) & 0x03030303) << 4;
            w[h] = __vsubss4(lo | hb, 0x20202020);
        }
        return;
    }
    if (T == T_Q3_K) {
        int half = j / 128, p = (j % 128) / 32, l = j % 32;
        *d = f16at(b + 108) * (float)q3k_scale(j / 16, b + 96);
        *m = 0.0f;
        int qs[2], hm[2];
        ld8(b + 32 + 32 * half + l, qs);
        ld8(b + l, hm);
        for (int h = 0; h < 2; h++) {
            int q = (qs[h] >> (2 * p)) & 0x03030303;
            int hb = (hm[h] >> (4 * half + p)) & 0x01010101;
            w[h] = __vsubss4(q | (hb << 2), 0x04040404);
        }
        return;
    }
    if (T == T_Q2_K) {
        int half = j / 128, p = (j % 128) / 32, l = j % 32;
        int sc = b[j / 16];
        *d = f16at(b + 80) * (float)(sc & 15);
        *m = -f16at(b + 82) * (float)(sc >> 4);
        ld8(b + 16 + 32 * half + l, w);
        for (int h = 0; h < 2; h++) w[h] = (w[h] >> (2 * p)) & 0x03030303;
        return;
    }
    *d = f16at(b);
    *m = Block32<T>::has_min ? f16at(b + 2) : 0.0f;
    if (T == T_Q8_0) {
        ld8(b + 2 + j, w);
        return;
    }
    const int qh_at = Block32<T>::has_min ? 4 : 2;
    const int qs_at = qh_at + (T == T_Q5_0 || T == T_Q5_1 ? 4 : 0);
    int shift = j >= 16 ? 4 : 0, q[2];
    ld8(b + qs_at + (j & 15), q);
    int lo = (q[0] >> shift) & 0x0F0F0F0F, hi = (q[1] >> shift) & 0x0F0F0F0F;
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

// A lane's eight activations x[e..e+8) in int8 against the absolute maximum of their block of
// 32 (the four lanes of a block agree through two shuffles; every lane of the warp takes part):
// the two words of four signed bytes, the step dx and the float sum of the eight.
__device__ __forceinline__ void quantize8(const float* x, int e, int* xq, float* dx, float* sx) {
    float xv[8];
    load_x8(x, e, xv);
    float amax = 0.0f, sum = 0.0f;
    for (int i = 0; i < 8; i++) {
        amax = fmaxf(amax, fabsf(xv[i]));
        sum += xv[i];
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int h = 0; h < 2; h++) {
        u32 v = 0;
        for (int i = 0; i < 4; i++) v |= (u32)(__float2int_rn(xv[4 * h + i] * inv) & 255) << (8 * i);
        xq[h] = (int)v;
    }
    *dx = amax / 127.0f;
    *sx = sum;
}

// Decode's activations in int8, quantized once per product by quantize_q8 (a launch of its
// own) and read by every block: with four rows a block, each block quantizing x for itself
// was 6% faster on Nemotron-width decode, but with fewer rows a block (more blocks, shorter
// walks: what llama.cpp's mat-vec does) that work multiplies; two rows a block reading
// quantized rows measured 228-241 tok/s against 211-220 on a 48-layer Qwen3-width Q4_K_M
// (BENCHMARKS.md). Row r of a quantized x lies at xq + r · q8_row_bytes(cols)
// and holds the cols signed bytes, then the step of each block of 32 (floats), then the float
// sum of each eight (rows padded to 16 bytes; cols is a multiple of 32, as every int8 type's
// block is).
__device__ __forceinline__ long long q8_row_bytes(int cols) {
    return ((long long)cols * 13 / 8 + 15) & ~15ll;
}

// quantize8 over `rows` rows of x (rows × cols floats) into xq: a warp per 256 columns of a row
// (blockIdx.y), the values every decode kernel on int8 activations reads.
extern "C" __global__ void quantize_q8(const float* x, u8* xq, int rows, int cols) {
    int lane = threadIdx.x % 32;
    int e0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * 256 + 8 * lane;
    int r = blockIdx.y;
    if (r >= rows) return;
    bool ok = e0 < cols;
    int e = ok ? e0 : 0, q[2];
    float dx, sx;
    quantize8(x + (long long)r * cols, e, q, &dx, &sx);
    if (!ok) return;
    u8* row = xq + r * q8_row_bytes(cols);
    *(int2*)(row + e) = make_int2(q[0], q[1]);
    if (e % 32 == 0) ((float*)(row + cols))[e / 32] = dx;
    ((float*)(row + cols + cols / 8))[e / 8] = sx;
}

// The distance between the two groups of eight elements a lane of rows_dot_i8 takes: elements
// whose quantized values share their bytes (a nibble type's low and high halves, Q6_K's
// quarters q and q + 2, Q2_K's and Q3_K's bit pairs p and p + 1), so that both groups' loads of
// the weights are the same loads; 8 (the next group) for the types without such a pair.
template <int T> struct PairStride {
    static const int v = T == T_Q4_0 || T == T_Q4_1 || T == T_Q5_0 || T == T_Q5_1 || T == T_IQ4_XS
                                 || T == T_MXFP4 ? 16
                         : T == T_Q2_K || T == T_Q3_K || T == T_Q4_K || T == T_Q5_K ? 32
                         : T == T_Q6_K ? 64 : 8;
};

// rows_dot with int8 activations: x holds quantize_q8's rows (the first of the nt). The same
// contract. A warp takes 512-element chunks; lane L the group ga of eight (below) and the group
// PairStride after it, both within one block of the type (rows are whole blocks), so one check
// covers both.
template <int T, int NT, int R>
__device__ __forceinline__ float rows_dot_i8(const u8* w, const u8* w2, long long row_bytes, int n,
                                             const void* x, int cols, int nt) {
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    const int P = PairStride<T>::v, G = P / 8;
    int ga = (lane / G) * 2 * G + lane % G;
    float acc[NT][R] = {};
    const u8* rowp[R];
    row_pointers<R>(w, w2, row_bytes, n, rowp);
    long long xrb = q8_row_bytes(cols);
    for (int base = wid * 512; base < cols; base += 512 * MV_WARPS) {
        int e0 = base + 8 * ga;
        bool ok = e0 < cols;
        int e[2] = {ok ? e0 : 0, (ok ? e0 : 0) + P};
        int xq8[NT][2][2];
        float dx[NT][2], sx[NT][2];
#pragma unroll
        for (int tt = 0; tt < NT; tt++) {
            const u8* xr = (const u8*)x + (tt < nt ? tt : 0) * xrb;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int2 v = *(const int2*)(xr + e[h]);
                xq8[tt][h][0] = v.x;
                xq8[tt][h][1] = v.y;
                dx[tt][h] = ((const float*)(xr + cols))[e[h] / 32];
                sx[tt][h] = ((const float*)(xr + cols + cols / 8))[e[h] / 8];
            }
        }
        long long blk = (long long)(e[0] / Block32<T>::elems) * Block32<T>::bytes;
#pragma unroll
        for (int j = 0; j < R; j++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int wq[2];
                float d, m;
                block_ints<T>(rowp[j] + blk, e[h] % Block32<T>::elems, wq, &d, &m);
#pragma unroll
                for (int tt = 0; tt < NT; tt++) {
                    // Rounded step by step (no contraction left to the compiler), so that a
                    // token's sums do not depend on the code around them.
                    int s = __dp4a(wq[1], xq8[tt][h][1], __dp4a(wq[0], xq8[tt][h][0], 0));
                    float v = __fmaf_rn(__fmul_rn(d, dx[tt][h]), (float)s, acc[tt][j]);
                    if (Block32<T>::has_min) v = __fmaf_rn(m, sx[tt][h], v);
                    if (ok) acc[tt][j] = v;
                }
            }
        }
    }
    return rows_total<NT, R>(acc);
}

// Row `r` of the activations a decode kernel of NT tokens a block was given: floats, or with
// int8 activations quantize_q8's rows.
template <bool I8, int NT>
__device__ __forceinline__ const void* x_row(const void* x, long long r, int cols) {
    if constexpr (I8) return (const u8*)x + r * q8_row_bytes(cols);
    else return (const float*)x + r * cols;
}

// The sums of a decode block's R rows (see rows_dot) on f32 or int8 activations.
template <int T, bool I8, int NT, int R>
__device__ __forceinline__ float rows_sum(const u8* w, const u8* w2, long long row_bytes, int n,
                                          const void* x, int cols, int nt) {
    if constexpr (I8) return rows_dot_i8<T, NT, R>(w, w2, row_bytes, n, x, cols, nt);
    else return rows_dot<T, NT, R>(w, w2, row_bytes, n, (const float*)x, cols, nt);
}

// y[t][r] = Σ_c w[r][c] · x[t][c] (+ b[r] where b is not null) for `tokens` rows of x,
// written as `epi` says: rows blk·MV_ROWS.. and tokens blockIdx.y·NT.. of it; with I8, x is
// quantize_q8's rows.
template <int T, bool I8, int NT>
__device__ void matmul_block(int blk, const u8* w, const void* x, float* y, const float* b,
                             int rows, int cols, long long row_bytes, int tokens, int epi) {
    int r0 = blk * MV_ROWS;
    int t0 = blockIdx.y * NT;
    if (r0 >= rows || t0 >= tokens) return;
    int n = min(MV_ROWS, rows - r0), nt = min(NT, tokens - t0);
    const u8* wr = w + (long long)r0 * row_bytes;
    float s = rows_sum<T, I8, NT, MV_ROWS>(wr, wr, row_bytes, n, x_row<I8, NT>(x, t0, cols), cols, nt);
    int tt = threadIdx.x / MV_ROWS, j = threadIdx.x % MV_ROWS;
    if (tt < nt && j < n) {
        if (b) s += b[r0 + j];
        put(y + (long long)(t0 + tt) * rows + r0 + j, s, epi);
    }
}

// Three products of the same activations in one launch (attention's q, k and v in decode: k
// and v alone are too few rows to fill the GPU): the row blocks of product i follow those of
// product i − 1, each stored with its bias added (none where null).
template <int T, bool I8, int NT>
__device__ void matmul3(const u8* w0, const u8* w1, const u8* w2, float* y0, float* y1, float* y2,
                        const float* b0, const float* b1, const float* b2, int rows0, int rows1,
                        int rows2, const void* x, int cols, long long row_bytes, int tokens) {
    int blk = blockIdx.x;
    int n0 = (rows0 + MV_ROWS - 1) / MV_ROWS, n1 = (rows1 + MV_ROWS - 1) / MV_ROWS;
    if (blk < n0) {
        matmul_block<T, I8, NT>(blk, w0, x, y0, b0, rows0, cols, row_bytes, tokens, EPI_STORE);
    } else if (blk < n0 + n1) {
        matmul_block<T, I8, NT>(blk - n0, w1, x, y1, b1, rows1, cols, row_bytes, tokens, EPI_STORE);
    } else {
        matmul_block<T, I8, NT>(blk - n0 - n1, w2, x, y2, b2, rows2, cols, row_bytes, tokens,
                                EPI_STORE);
    }
}

// The products of routed experts for decode: pair p (token p / k, its slot p % k) multiplies
// expert ids[p] (rows ids[p]·rows .. +rows of the stacked w) by x row p / k (or row p when
// `x_per_pair`), adds row bids[p] of the bias b (rows of `rows`; none where null: the expert's
// own id where ids index a cache's slots) and writes y row p as `epi` says. One block per
// MV_ROWS rows and pair; no copy of expert ids to the host.
template <int T, bool I8>
__device__ void matmul_id(const u8* w, const void* x, float* y, const int* ids, const float* b,
                          const int* bids, int rows, int cols, long long row_bytes, int pairs, int k, int x_per_pair,
                          int epi) {
    int r0 = blockIdx.x * MV_ROWS;
    int p = blockIdx.y;
    if (r0 >= rows || p >= pairs) return;
    int n = min(MV_ROWS, rows - r0);
    long long e = ids[p];
    const void* xt = x_row<I8, 1>(x, x_per_pair ? p : p / k, cols);
    const u8* wr = w + (e * rows + r0) * row_bytes;
    float s = rows_sum<T, I8, 1, MV_ROWS>(wr, wr, row_bytes, n, xt, cols, 1);
    if (threadIdx.x < n) {
        if (b) s += b[(long long)bids[p] * rows + r0 + threadIdx.x];
        put(y + (long long)p * rows + r0 + threadIdx.x, s, epi);
    }
}

// A gated activation of gate value g and up value u: SiLU (act 0) or GELU-tanh (1) of g times
// u, or gpt-oss's clamped SwiGLU (2: g capped at limit, u clamped to ±limit,
// g·σ(α·g)·(u + 1)).
__device__ __forceinline__ float gated(float g, float u, int act, float alpha, float limit) {
    if (act == 0) return silu(g) * u;
    if (act == 1) return gelu_tanh(g) * u;
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return g / (1.0f + expf(-alpha * g)) * (u + 1.0f);
}

// A routed expert's gate and up products for decode with their biases (bg, bu: rows bids[p];
// none where null) and the gated activation, in one pass: y row p = gated(gate_e · x + bg,
// up_e · x + bu) for pair p, expert e = ids[p], token p / k. A block takes MV_ROWS rows of both matrices
// (eight rows sharing each load of x); each product is what matmul_id gives, so y is what the
// separate products, bias additions and gated_act give, bit for bit.
template <int T, bool I8>
__device__ void matmul_gated_id(const u8* wg, const u8* wu, const void* x, float* y,
                                const int* ids, const float* bg, const float* bu,
                                const int* bids, int rows,
                                int cols, long long row_bytes, int pairs, int k, int act,
                                float alpha, float limit) {
    int r0 = blockIdx.x * MV_ROWS;
    int p = blockIdx.y;
    if (r0 >= rows || p >= pairs) return;
    int n = min(MV_ROWS, rows - r0);
    long long e = ids[p];
    long long at = (e * rows + r0) * row_bytes;
    float s = rows_sum<T, I8, 1, 2 * MV_ROWS>(wg + at, wu + at, row_bytes, n,
                                              x_row<I8, 1>(x, p / k, cols), cols, 1);
    __shared__ float total[2 * MV_ROWS];
    if (threadIdx.x < 2 * MV_ROWS) total[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x < n) {
        long long r = (bg || bu ? (long long)bids[p] : 0) * rows + r0 + threadIdx.x;
        float g = total[threadIdx.x], u = total[threadIdx.x + MV_ROWS];
        if (bg) g += bg[r];
        if (bu) u += bu[r];
        y[(long long)p * rows + r0 + threadIdx.x] = gated(g, u, act, alpha, limit);
    }
}

#define MATMUL_FAMILY(name, s, T, I8)                                                            \
    extern "C" __global__ void name##s(const u8* w, const void* x, float* y, int rows, int cols, \
                                       long long row_bytes, int tokens, int epi, const float* b) {\
        matmul_block<T, I8, 1>(blockIdx.x, w, x, y, b, rows, cols, row_bytes, tokens, epi);      \
    }                                                                                            \
    extern "C" __global__ void name##s##_x4(const u8* w, const void* x, float* y, int rows,      \
                                            int cols, long long row_bytes, int tokens, int epi,  \
                                            const float* b) {                                    \
        matmul_block<T, I8, MV_TOKENS>(blockIdx.x, w, x, y, b, rows, cols, row_bytes, tokens, epi);\
    }                                                                                            \
    extern "C" __global__ void name##s##_3(const u8* w0, const u8* w1, const u8* w2, float* y0,  \
                                           float* y1, float* y2, const float* b0,                \
                                           const float* b1, const float* b2, int rows0,          \
                                           int rows1, int rows2, const void* x, int cols,        \
                                           long long row_bytes, int tokens) {                    \
        matmul3<T, I8, 1>(w0, w1, w2, y0, y1, y2, b0, b1, b2, rows0, rows1, rows2, x, cols,      \
                          row_bytes, tokens);                                                    \
    }                                                                                            \
    extern "C" __global__ void name##s##_3_x4(const u8* w0, const u8* w1, const u8* w2,          \
                                              float* y0, float* y1, float* y2, const float* b0,  \
                                              const float* b1, const float* b2, int rows0,       \
                                              int rows1, int rows2, const void* x, int cols,     \
                                              long long row_bytes, int tokens) {                 \
        matmul3<T, I8, MV_TOKENS>(w0, w1, w2, y0, y1, y2, b0, b1, b2, rows0, rows1, rows2, x,    \
                                  cols, row_bytes, tokens);                                      \
    }                                                                                            \
    extern "C" __global__ void name##s##_id(const u8* w, const void* x, float* y, const int* ids,\
                                            const float* b, const int* bids, int rows, int cols, \
                                            long long row_bytes, int pairs, int k,               \
                                            int x_per_pair, int epi) {                           \
        matmul_id<T, I8>(w, x, y, ids, b, bids, rows, cols, row_bytes, pairs, k, x_per_pair, epi);\
    }                                                                                            \
    extern "C" __global__ void name##s##_gated_id(const u8* wg, const u8* wu, const void* x,     \
                                                  float* y, const int* ids, const float* bg,     \
                                                  const float* bu, const int* bids, int rows,    \
                                                  int cols, long long row_bytes, int pairs,      \
                                                  int k, int act, float alpha, float limit) {    \
        matmul_gated_id<T, I8>(wg, wu, x, y, ids, bg, bu, bids, rows, cols, row_bytes, pairs, k, \
                               act, alpha, limit);                                               \
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

// The residual add and the next norm of a decoder layer in one pass: x[t] += y[t], then
// h[t] = RMSNorm(x[t]) · w, one block per row; the same sums as add then rms_norm, bit for bit.
extern "C" __global__ void add_rms_norm(float* x, const float* y, const float* w, float* h, int n,
                                        float eps) {
    float* xr = x + (long long)blockIdx.x * n;
    const float* yr = y + (long long)blockIdx.x * n;
    float* hr = h + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] + yr[i];
        xr[i] = v;
        s = fmaf(v, v, s);
    }
    float inv = rsqrtf(block_sum(s) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) hr[i] = (xr[i] * inv) * w[i];
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

// KV cache elements: f32 (exact mode) or f16 bits (normal precision, as the CPU's default
// cache), read and written as floats.
__device__ __forceinline__ float kv_get(const float* c, long long i) { return c[i]; }
__device__ __forceinline__ float kv_get(const u16* c, long long i) { return half_to_float(c[i]); }
__device__ __forceinline__ void kv_put(float* c, long long i, float v) { c[i] = v; }
__device__ __forceinline__ void kv_put(u16* c, long long i, float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    c[i] = h;
}

// The K and V rows of `t` new positions (n = t · row floats each) into the caches at position
// *pastp: the position is read on the device, so that a captured decode step (a CUDA graph)
// replays at every position.
template <typename C>
__device__ void kv_store_rows(const float* kn, const float* vn, C* kc, C* vc, const int* pastp,
                              int row, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long at = (long long)(*pastp) * row + i;
    kv_put(kc, at, kn[i]);
    kv_put(vc, at, vn[i]);
}

extern "C" __global__ void kv_store(const float* kn, const float* vn, float* kc, float* vc,
                                    const int* pastp, int row, int n) {
    kv_store_rows(kn, vn, kc, vc, pastp, row, n);
}

extern "C" __global__ void kv_store_f16(const float* kn, const float* vn, u16* kc, u16* vc,
                                        const int* pastp, int row, int n) {
    kv_store_rows(kn, vn, kc, vc, pastp, row, n);
}

#define ATT_WARPS 4
#define ATT_STEP 4
// Causal attention for the `t` new tokens at positions past..past+t−1 over the cached K and V
// (rows of n_kv·hd, positions 0..past+t−1 already stored), *pastp read on the device. Block
// (head, token, split) of ATT_WARPS warps takes split blockIdx.z of the gridDim.z equal runs of
// the positions the token sees (all before it and itself, or the last `window` of them; window
// 0: no window): warp w takes positions w, w + ATT_WARPS, ... of the run with an online
// softmax, lane j holding dimensions j, j + 32, ... (head dims up to 256), and the warps merge
// at the end. Without SPLIT (one run) the block writes the head's output; with it (decode over
// a long cache, where heads × tokens alone leave most of the GPU idle) it writes its run's
// partial (max, sum of exponentials, unnormalized values: hd + 2 floats at `part`) and
// attention_merge combines them. `sinks` (null: none): one logit per head that joins the
// softmax's maximum and denominator without a value row (gpt-oss).
template <bool SPLIT, int PER, typename C>
__device__ void attention_runs(const float* q, const C* kc, const C* vc, float* out,
                               float* part, const int* pastp, int nh, int nkv, int hd,
                               float scale, int window, const float* sinks) {
    int past = *pastp;
    __shared__ float acc_s[ATT_WARPS][32 * PER];
    __shared__ float m_s[ATT_WARPS], l_s[ATT_WARPS];
    int h = blockIdx.x, ti = blockIdx.y, splits = SPLIT ? gridDim.z : 1;
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    int kvh = h / (nh / nkv), row = nkv * hd;
    int end = past + ti + 1;
    int first = (window > 0 && end > window) ? end - window : 0;
    int lo = first, hi = end;
    if (SPLIT) {
        int run = (end - first + splits - 1) / splits;
        lo = first + blockIdx.z * run;
        hi = min(end, lo + run);
    }
    const float* qh = q + ((long long)ti * nh + h) * hd;
    float qv[PER], acc[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) {
        int d = lane + 32 * j;
        qv[j] = d < hd ? qh[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    // ATT_STEP consecutive positions a warp per iteration: their K and V loads in flight
    // together and one rescale of the accumulators (a position past the run reads the run's
    // last and weighs 0).
    for (int p0 = lo + wid * ATT_STEP; p0 < hi; p0 += ATT_WARPS * ATT_STEP) {
        float s[ATT_STEP], vv[ATT_STEP][PER];
#pragma unroll
        for (int i = 0; i < ATT_STEP; i++) {
            long long at = (long long)min(p0 + i, hi - 1) * row + kvh * hd;
            float a = 0.0f;
#pragma unroll
            for (int j = 0; j < PER; j++) {
                int d = lane + 32 * j;
                bool in = d < hd;
                a = fmaf(qv[j], in ? kv_get(kc, at + d) : 0.0f, a);
                vv[i][j] = in ? kv_get(vc, at + d) : 0.0f;
            }
            s[i] = a;
        }
        float mn = m;
#pragma unroll
        for (int i = 0; i < ATT_STEP; i++) {
            s[i] = p0 + i < hi ? warp_sum(s[i]) * scale : NEG_INF;
            mn = fmaxf(mn, s[i]);
        }
        float corr = expf(m - mn), e[ATT_STEP];
        l *= corr;
#pragma unroll
        for (int i = 0; i < ATT_STEP; i++) {
            e[i] = expf(s[i] - mn);
            l += e[i];
        }
#pragma unroll
        for (int j = 0; j < PER; j++) {
            float a = acc[j] * corr;
#pragma unroll
            for (int i = 0; i < ATT_STEP; i++) a = fmaf(e[i], vv[i][j], a);
            acc[j] = a;
        }
        m = mn;
    }
    for (int j = 0; j < PER; j++) {
        int d = lane + 32 * j;
        if (d < hd) acc_s[wid][d] = acc[j];
    }
    if (lane == 0) {
        m_s[wid] = m;
        l_s[wid] = l;
    }
    __syncthreads();
    // Sinks join once, where the head's output is written.
    const bool last = !SPLIT;
    float mx = last && sinks ? sinks[h] : NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, m_s[w]);
    float lsum = last && sinks ? expf(sinks[h] - mx) : 0.0f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = l_s[w] > 0.0f ? expf(m_s[w] - mx) : 0.0f;
        lsum += l_s[w] * f[w];
    }
    long long head = (long long)ti * nh + h;
    float* o = last ? out + head * hd : part + (head * splits + blockIdx.z) * (hd + 2) + 2;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) v = fmaf(acc_s[w][d], f[w], v);
        o[d] = last ? v / lsum : v;
    }
    if (!last && threadIdx.x == 0) {
        o[-2] = mx;
        o[-1] = lsum;
    }
}

// attention_runs with PER (a lane's dimensions: 1, 2, 4 or 8) fixed for the head size, so that
// the query and the accumulators stay in registers.
template <bool SPLIT, typename C>
__device__ __forceinline__ void attention_by_size(const float* q, const C* kc, const C* vc,
                                                  float* out, float* part, const int* pastp,
                                                  int nh, int nkv, int hd, float scale,
                                                  int window, const float* sinks) {
    if (hd <= 32)
        attention_runs<SPLIT, 1>(q, kc, vc, out, part, pastp, nh, nkv, hd, scale, window, sinks);
    else if (hd <= 64)
        attention_runs<SPLIT, 2>(q, kc, vc, out, part, pastp, nh, nkv, hd, scale, window, sinks);
    else if (hd <= 128)
        attention_runs<SPLIT, 4>(q, kc, vc, out, part, pastp, nh, nkv, hd, scale, window, sinks);
    else
        attention_runs<SPLIT, 8>(q, kc, vc, out, part, pastp, nh, nkv, hd, scale, window, sinks);
}

// attention and attention_split over an f32 cache (no suffix) and an f16 one (_f16).
#define ATTENTION(sfx, C)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) attention##sfx(                  \
        const float* q, const C* kc, const C* vc, float* out, const int* pastp, int nh, int nkv, \
        int hd, float scale, int window, const float* sinks) {                                   \
        attention_by_size<false>(q, kc, vc, out, nullptr, pastp, nh, nkv, hd, scale, window,     \
                                 sinks);                                                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) attention_split##sfx(            \
        const float* q, const C* kc, const C* vc, float* part, const int* pastp, int nh,         \
        int nkv, int hd, float scale, int window, const float* sinks) {                          \
        attention_by_size<true>(q, kc, vc, nullptr, part, pastp, nh, nkv, hd, scale, window,     \
                                sinks);                                                          \
    }

ATTENTION(, float)
ATTENTION(_f16, u16)

// The output of head blockIdx.x, token blockIdx.y from the `splits` partials attention wrote
// (hd + 2 floats each: max, sum, values): a run with no positions (sum 0) counts for nothing;
// the head's sink (where `sinks` is not null) joins the maximum and the denominator.
extern "C" __global__ void attention_merge(const float* part, float* out, int nh, int hd,
                                           int splits, const float* sinks) {
    int h = blockIdx.x;
    long long head = (long long)blockIdx.y * nh + h;
    const float* pp = part + head * splits * (hd + 2);
    float mx = sinks ? sinks[h] : NEG_INF;
    for (int s = 0; s < splits; s++) {
        if (pp[s * (hd + 2) + 1] > 0.0f) mx = fmaxf(mx, pp[s * (hd + 2)]);
    }
    float lsum = sinks ? expf(sinks[h] - mx) : 0.0f;
    for (int s = 0; s < splits; s++) {
        float l = pp[s * (hd + 2) + 1];
        if (l > 0.0f) lsum += l * expf(pp[s * (hd + 2)] - mx);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float* r = pp + s * (hd + 2);
            if (r[1] > 0.0f) v = fmaf(r[2 + d], expf(r[0] - mx), v);
        }
        out[head * hd + d] = v / lsum;
    }
}

// Prefill attention on the tensor cores (normal precision; flash attention): the rows of a KV
// head are its query heads' (token, head) pairs, token-major, so that the heads sharing the KV
// head (GQA) read each K and V tile once. Block (tile of FA_ROWS rows, KV head) of FA_WARPS
// warps, a warp 16 rows: per FA_KV positions the block stages K and V as f16 in shared memory
// (an f32 cache converted on the way), each warp computes its 16 × FA_KV logits with f16 mma.sync (f32 sums) against its
// query fragments held in registers, masks them (causal, window), folds them into an online
// softmax (a thread holds two rows' quarter; the four threads of a row agree on its maximum
// through shuffles) and adds P·V with the probabilities as f16 A fragments taken straight from
// the logit accumulators and V's B fragments by ldmatrix.trans. `sinks` (null: none) join each
// row's maximum and denominator. Head dims: HD a multiple of 16 (instantiated 64 and 128).
#define FA_WARPS 4
#define FA_ROWS (16 * FA_WARPS)
#define FA_KV 64

// Two floats as an f16 pair (lo in the low half), rounded to nearest even.
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c += a · b on an m16n8k16 tile: f16 operands, f32 sums.
__device__ __forceinline__ void mma_f16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four cache elements at `at` as f16 bits into shared memory (zeros where `in` is false).
__device__ __forceinline__ void stage4(const float* c, long long at, bool in, u16* dst) {
    float4 v = in ? *(const float4*)(c + at) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    *(uint2*)dst = make_uint2(pack_f16(v.x, v.y), pack_f16(v.z, v.w));
}
__device__ __forceinline__ void stage4(const u16* c, long long at, bool in, u16* dst) {
    *(uint2*)dst = in ? *(const uint2*)(c + at) : make_uint2(0u, 0u);
}

template <int HD, typename C>
__device__ void attention_flash(const float* q, const C* kc, const C* vc, float* out,
                                const int* pastp, int t, int nh, int nkv, float scale,
                                int window, const float* sinks) {
    constexpr int PAD = HD + 8;  // rows of 16-byte multiples, fragment loads in distinct banks
    __shared__ __align__(16) unsigned short ks[FA_KV][PAD];
    __shared__ __align__(16) unsigned short vs[FA_KV][PAD];
    int past = *pastp;
    int tid = threadIdx.x, lane = tid % 32, wid = tid / 32, gid = lane >> 2, tig = lane & 3;
    int g = nh / nkv, kvh = blockIdx.y, row = nkv * HD, rows = t * g;
    int r0 = blockIdx.x * FA_ROWS;
    // The positions the block's tokens see: from the first token's first to the last's end.
    int t_lo = r0 / g, t_hi = min(t - 1, (r0 + FA_ROWS - 1) / g);
    int e_lo = past + t_lo + 1, hi = past + t_hi + 1;
    int lo = (window > 0 && e_lo > window) ? e_lo - window : 0;
    // This thread's rows: gid and gid + 8 of its warp's 16 (a and b).
    int ra = r0 + wid * 16 + gid, rb = ra + 8;
    bool va = ra < rows, vb = rb < rows;
    int ta = va ? ra / g : 0, tb = vb ? rb / g : 0;
    int ha = kvh * g + ra % g, hb = kvh * g + rb % g;
    int enda = past + ta + 1, endb = past + tb + 1;
    int firsta = (window > 0 && enda > window) ? enda - window : 0;
    int firstb = (window > 0 && endb > window) ? endb - window : 0;
    const float* qra = q + ((long long)ta * nh + ha) * HD;
    const float* qrb = q + ((long long)tb * nh + hb) * HD;
    u32 qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        int c = kk * 16 + 2 * tig;
        float2 a0 = va ? *(const float2*)(qra + c) : make_float2(0.0f, 0.0f);
        float2 a1 = va ? *(const float2*)(qra + c + 8) : make_float2(0.0f, 0.0f);
        float2 b0 = vb ? *(const float2*)(qrb + c) : make_float2(0.0f, 0.0f);
        float2 b1 = vb ? *(const float2*)(qrb + c + 8) : make_float2(0.0f, 0.0f);
        qf[kk][0] = pack_f16(a0.x, a0.y);
        qf[kk][1] = pack_f16(b0.x, b0.y);
        qf[kk][2] = pack_f16(a1.x, a1.y);
        qf[kk][3] = pack_f16(b1.x, b1.y);
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // A sink starts the row's maximum with a denominator term of 1 (held by one of its four
    // threads).
    float ma = sinks && va ? sinks[ha] : NEG_INF, mb = sinks && vb ? sinks[hb] : NEG_INF;
    float la = sinks && va && tig == 0 ? 1.0f : 0.0f, lb = sinks && vb && tig == 0 ? 1.0f : 0.0f;
    for (int p0 = lo; p0 < hi; p0 += FA_KV) {
        __syncthreads();  // the previous tile's fragments are read
        for (int i = tid; i < FA_KV * HD / 4; i += 32 * FA_WARPS) {
            int pp = i / (HD / 4), c = (i % (HD / 4)) * 4, p = p0 + pp;
            long long at = (long long)p * row + kvh * HD + c;
            stage4(kc, at, p < hi, &ks[pp][c]);
            stage4(vc, at, p < hi, &vs[pp][c]);
        }
        __syncthreads();
        // Logits: s[j] is the 16 × 8 tile of positions p0 + 8j.. (c0, c1: row a, positions
        // 2·tig and 2·tig + 1; c2, c3: row b).
        float s[FA_KV / 8][4];
#pragma unroll
        for (int j = 0; j < FA_KV / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int j = 0; j < FA_KV / 8; j++) {
                const unsigned short* kr = &ks[8 * j + gid][16 * kk + 2 * tig];
                mma_f16(s[j], qf[kk], *(const u32*)kr, *(const u32*)(kr + 8));
            }
        }
        float xa = ma, xb = mb;
#pragma unroll
        for (int j = 0; j < FA_KV / 8; j++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int p = p0 + 8 * j + 2 * tig + (c & 1);
                bool in = c < 2 ? va && p >= firsta && p < enda : vb && p >= firstb && p < endb;
                s[j][c] = in ? s[j][c] * scale : NEG_INF;
            }
            xa = fmaxf(xa, fmaxf(s[j][0], s[j][1]));
            xb = fmaxf(xb, fmaxf(s[j][2], s[j][3]));
        }
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
        // A row with nothing seen yet keeps -inf; its base 0 makes every term 0.
        float ba = xa == NEG_INF ? 0.0f : xa, bb = xb == NEG_INF ? 0.0f : xb;
        float ca = expf(ma - ba), cb = expf(mb - bb);
        ma = xa;
        mb = xb;
        la *= ca;
        lb *= cb;
        u32 pa[FA_KV / 8], pb[FA_KV / 8];
#pragma unroll
        for (int j = 0; j < FA_KV / 8; j++) {
            float e0 = expf(s[j][0] - ba), e1 = expf(s[j][1] - ba);
            float e2 = expf(s[j][2] - bb), e3 = expf(s[j][3] - bb);
            la += e0 + e1;
            lb += e2 + e3;
            pa[j] = pack_f16(e0, e1);
            pb[j] = pack_f16(e2, e3);
        }
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= ca;
            o[n][1] *= ca;
            o[n][2] *= cb;
            o[n][3] *= cb;
        }
        // P · V: positions 16·kk.. as the k of an A fragment (two logit tiles), V's 8 × 8
        // matrices transposed into B fragments, two dimension tiles per ldmatrix.
#pragma unroll
        for (int kk = 0; kk < FA_KV / 16; kk++) {
            u32 a[4] = {pa[2 * kk], pb[2 * kk], pa[2 * kk + 1], pb[2 * kk + 1]};
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                const unsigned short* vr =
                    &vs[16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8][8 * n + (lane >> 4) * 8];
                u32 b[4];
                u32 addr = (u32)__cvta_generic_to_shared(vr);
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                             : "r"(addr));
                mma_f16(o[n], a, b[0], b[1]);
                mma_f16(o[n + 1], a, b[2], b[3]);
            }
        }
    }
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    float* oa = out + ((long long)ta * nh + ha) * HD;
    float* ob = out + ((long long)tb * nh + hb) * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int d = 8 * n + 2 * tig;
        if (va) *(float2*)(oa + d) = make_float2(o[n][0] / la, o[n][1] / la);
        if (vb) *(float2*)(ob + d) = make_float2(o[n][2] / lb, o[n][3] / lb);
    }
}

#define ATTENTION_FLASH(HD, sfx, C)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS) attention_flash_##HD##sfx(       \
        const float* q, const C* kc, const C* vc, float* out, const int* pastp, int t, int nh,   \
        int nkv, float scale, int window, const float* sinks) {                                  \
        attention_flash<HD>(q, kc, vc, out, pastp, t, nh, nkv, scale, window, sinks);            \
    }

ATTENTION_FLASH(64, , float)
ATTENTION_FLASH(128, , float)
ATTENTION_FLASH(64, _f16, u16)
ATTENTION_FLASH(128, _f16, u16)

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

// x[t] += Σ_s wts[t·k + s] · y[pos[t·k + s]] (pos null: y row t·k + s) for n-wide rows, or
// x[t] = the sum where `accumulate` is 0 (x unread); a position outside y's `y_rows` rows is
// skipped.
extern "C" __global__ void moe_combine(const float* y, const int* pos, const float* wts, float* x,
                                       int t, int k, int n, int y_rows, int accumulate) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)t * n) return;
    int ti = i / n, c = i % n;
    float acc = accumulate ? x[i] : 0.0f;
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

// Attention's per-head q and k norms and RoPE in one launch, a warp per head: the q heads of
// the t rows (nh a row), then their k heads (nkv a row), each RMSNorm'd over its hd values
// times qw (kw) where that is not null, then its first n_rot dims rotated by the (cos, sin)
// pairs of its row in cs (t × n_rot/2 pairs, computed on the host as the CPU does): pairs
// (i, i + n_rot/2) in neox order, else (2i, 2i + 1). Rounded products, as the CPU's. hd ≤ 256.
#define QK_WARPS 4
extern "C" __global__ void __launch_bounds__(32 * QK_WARPS)
qk_norm_rope(float* q, float* k, const float* qw, const float* kw, const float* cs, int t, int nh,
             int nkv, int hd, int n_rot, int neox, float eps) {
    __shared__ float buf[QK_WARPS][256];
    int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    long long head = (long long)blockIdx.x * QK_WARPS + wid;
    long long qheads = (long long)t * nh;
    if (head >= qheads + (long long)t * nkv) return;
    bool is_q = head < qheads;
    long long j = is_q ? head : head - qheads;
    long long r = j / (is_q ? nh : nkv);
    float* x = (is_q ? q : k) + j * hd;
    const float* w = is_q ? qw : kw;
    float* v = buf[wid];
    float s = 0.0f;
    for (int i = lane; i < hd; i += 32) {
        v[i] = x[i];
        s = fmaf(v[i], v[i], s);
    }
    if (w) {
        float inv = rsqrtf(warp_sum(s) / (float)hd + eps);
        for (int i = lane; i < hd; i += 32) v[i] = (v[i] * inv) * w[i];
    }
    __syncwarp();
    int half = n_rot / 2;
    for (int p = lane; p < half; p += 32) {
        float c = cs[(r * half + p) * 2], sn = cs[(r * half + p) * 2 + 1];
        int ia = neox ? p : 2 * p, ib = neox ? p + half : 2 * p + 1;
        float a = v[ia], b = v[ib];
        x[ia] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
        x[ib] = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, c));
    }
    for (int i = n_rot + lane; i < hd; i += 32) x[i] = v[i];
}

// y[r] += b[ids[r]] for rows of n (ids null: the one row b).
extern "C" __global__ void add_bias(float* y, const float* b, const int* ids, int rows, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n) return;
    int r = i / n, c = i % n;
    y[i] += b[(long long)(ids ? ids[r] : 0) * n + c];
}

// g = act(g) · u over n values: 0 SiLU, 1 GELU (tanh), 2 gpt-oss's clamped SwiGLU (gate
// clamped above at limit, up to ±limit, gate·σ(α·gate)·(up + 1)).
extern "C" __global__ void gated_act(float* g, const float* u, long long n, int act, float alpha,
                                     float limit) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    g[i] = gated(g[i], u[i], act, alpha, limit);
}

// x = c · tanh(x / c) over n values (logit soft-capping).
extern "C" __global__ void softcap(float* x, long long n, float c) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = c * tanhf(x[i] / c);
}
