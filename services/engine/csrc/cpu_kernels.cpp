// Nitsum's CPU kernels: the decode-step work that eager PyTorch does in many small ops or
// through copies. Built on first use by services/engine/cpu_kernels.py (g++ -O3 -march=native
// -fopenmp) and called through ctypes with raw pointers; no PyTorch headers, so a build takes a
// couple of seconds. OpenMP resolves to the libgomp that torch has already loaded, so both share
// one thread pool and torch.set_num_threads governs them.
//
// dtype codes: 0 = float32, 1 = bfloat16. Every kernel computes in float32 and rounds where the
// reference (transformers' eager Llama) rounds, so bfloat16 results match it op for op.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

inline float bf16_to_f32(uint16_t h) { return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

template <typename T> struct Elem;
template <> struct Elem<float> {
    static float load(float x) { return x; }
    static float store(float x) { return x; }
    static float round(float x) { return x; }
};
template <> struct Elem<uint16_t> {
    static float load(uint16_t x) { return bf16_to_f32(x); }
    static uint16_t store(float x) { return f32_to_bf16(x); }
    static float round(float x) { return bf16_to_f32(f32_to_bf16(x)); }
};

// exp for softmax: range reduction to 2^n * e^r, |r| <= ln2/2, and a degree-6 polynomial
// (relative error ~2e-7). Written so that gcc vectorises the loops that call it; libm's expf
// does not vectorise without -ffast-math.
inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.3888949e-3f;
    p = p * r + 8.3333568e-3f;
    p = p * r + 4.1666642e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    return p * __builtin_bit_cast(float, bits);
}

// Calls fn(t, row) for the first len tokens of a sequence, each row in its block of the cache.
template <typename T, typename Fn>
inline void for_each_token(const T* cache, int64_t c_sb, int64_t c_st, const int64_t* table, int64_t len, int bs,
                           Fn fn) {
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += bs, ++blk) {
        const T* block = cache + table[blk] * c_sb;
        const int64_t n = len - t0 < bs ? len - t0 : bs;
        for (int64_t j = 0; j < n; ++j) fn(t0 + j, block + j * c_st);
    }
}

// Decode attention of one sequence and one KV head over its blocks: the G query heads that
// share the KV head. Two passes over the keys' scores (max, then exp and sum), one over values.
template <typename T>
void decode_one(const T* q, int64_t q_sh, const T* kc, const T* vc, int64_t c_sb, int64_t c_st,
                const int64_t* table, int64_t len, int G, int bs, int d, float scale, T* out, int64_t o_sh,
                float* qf, float* sc, float* acc) {
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i) qf[g * d + i] = Elem<T>::load(q[g * q_sh + i]) * scale;
    for_each_token(kc, c_sb, c_st, table, len, bs, [&](int64_t t, const T* kr) {
        for (int g = 0; g < G; ++g) {
            const float* qg = qf + g * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < d; ++i) s += qg[i] * Elem<T>::load(kr[i]);
            sc[g * len + t] = s;
        }
    });
    for (int g = 0; g < G; ++g) {
        float* s = sc + g * len;
        float m = -INFINITY;
        for (int64_t t = 0; t < len; ++t) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            s[t] = exp_approx(s[t] - m);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    }
    std::memset(acc, 0, sizeof(float) * G * d);
    for_each_token(vc, c_sb, c_st, table, len, bs, [&](int64_t t, const T* vr) {
        for (int g = 0; g < G; ++g) {
            const float p = sc[g * len + t];
            float* a = acc + g * d;
#pragma omp simd
            for (int i = 0; i < d; ++i) a[i] += p * Elem<T>::load(vr[i]);
        }
    });
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i) out[g * o_sh + i] = Elem<T>::store(acc[g * d + i]);
}

template <typename T>
void decode_attention(const T* q, int64_t q_sb, int64_t q_sh, const T* kc, const T* vc, int64_t c_sb,
                      int64_t c_sh, int64_t c_st, const int64_t* tables, int64_t t_sb, const int64_t* lens,
                      int B, int H, int KVH, int bs, int d, float scale, T* out, int64_t o_sb, int64_t o_sh) {
    const int G = H / KVH;
    int64_t max_len = 1;
    for (int b = 0; b < B; ++b) max_len = lens[b] > max_len ? lens[b] : max_len;
    const int tasks = B * KVH;
#pragma omp parallel if (tasks > 1)
    {
        float* buf = static_cast<float*>(std::malloc(sizeof(float) * (2 * G * d + G * max_len)));
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; ++task) {
            const int b = task / KVH, h = task % KVH;
            decode_one<T>(q + b * q_sb + h * G * q_sh, q_sh, kc + h * c_sh, vc + h * c_sh, c_sb, c_st,
                          tables + b * t_sb, lens[b], G, bs, d, scale, out + b * o_sb + h * G * o_sh, o_sh, buf,
                          buf + 2 * G * d, buf + G * d);
        }
        std::free(buf);
    }
}

// residual += h (rounded to T, as the reference's add is), then out = w * T(rms_norm(residual)).
template <typename T>
void add_rms_norm(T* residual, const T* h, const T* w, T* out, int64_t rows, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (rows * D >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        T* x = residual + r * D;
        if (h != nullptr) {
            const T* y = h + r * D;
            for (int64_t i = 0; i < D; ++i) x[i] = Elem<T>::store(Elem<T>::load(x[i]) + Elem<T>::load(y[i]));
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; ++i) {
            const float v = Elem<T>::load(x[i]);
            ss += v * v;
        }
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
        T* o = out + r * D;
        for (int64_t i = 0; i < D; ++i)
            o[i] = Elem<T>::store(Elem<T>::load(w[i]) * Elem<T>::round(Elem<T>::load(x[i]) * inv));
    }
}

// Rotary embedding on q and k in place (rows of the fused QKV output), then k and v of each
// token written into its (block, offset) slot of the paged cache. Rounds like the reference:
// T(T(x * cos) + T(rotate_half(x) * sin)), with cos and sin already in T.
template <typename T>
void rope_store_kv(T* qkv, int64_t rows, int64_t row_stride, int H, int KVH, int d, const T* cos, const T* sin,
                   const int64_t* positions, T* kc, T* vc, int64_t c_sb, int64_t c_sh, int64_t c_st,
                   const int64_t* slot_blocks, const int64_t* slot_offsets) {
    const int half = d / 2;
#pragma omp parallel for schedule(static) if (rows >= 16)
    for (int64_t r = 0; r < rows; ++r) {
        T* row = qkv + r * row_stride;
        const T* c = cos + positions[r] * d;
        const T* s = sin + positions[r] * d;
        for (int head = 0; head < H + KVH; ++head) {
            T* x = row + static_cast<int64_t>(head) * d;
            for (int i = 0; i < half; ++i) {
                const float a = Elem<T>::load(x[i]), b = Elem<T>::load(x[i + half]);
                const float lo = Elem<T>::round(a * Elem<T>::load(c[i])) + Elem<T>::round(-b * Elem<T>::load(s[i]));
                const float hi = Elem<T>::round(b * Elem<T>::load(c[i + half])) +
                                 Elem<T>::round(a * Elem<T>::load(s[i + half]));
                x[i] = Elem<T>::store(lo);
                x[i + half] = Elem<T>::store(hi);
            }
        }
        const int64_t base = slot_blocks[r] * c_sb + slot_offsets[r] * c_st;
        for (int h = 0; h < KVH; ++h) {
            std::memcpy(kc + base + h * c_sh, row + static_cast<int64_t>(H + h) * d, sizeof(T) * d);
            std::memcpy(vc + base + h * c_sh, row + static_cast<int64_t>(H + KVH + h) * d, sizeof(T) * d);
        }
    }
}

}  // namespace

extern "C" {

int nitsum_kernels_version() { return 1; }

// q [B, H, d] (strides q_sb, q_sh; d contiguous); caches [blocks, KVH, bs, d] (strides c_sb, c_sh,
// c_st); tables [B, >= ceil(len/bs)] (row stride t_sb); lens [B] keys per sequence; out like q.
void nitsum_decode_attention(int dtype, const void* q, int64_t q_sb, int64_t q_sh, const void* kc, const void* vc,
                             int64_t c_sb, int64_t c_sh, int64_t c_st, const int64_t* tables, int64_t t_sb,
                             const int64_t* lens, int B, int H, int KVH, int bs, int d, float scale, void* out,
                             int64_t o_sb, int64_t o_sh) {
    if (dtype == 1)
        decode_attention<uint16_t>(static_cast<const uint16_t*>(q), q_sb, q_sh, static_cast<const uint16_t*>(kc),
                                   static_cast<const uint16_t*>(vc), c_sb, c_sh, c_st, tables, t_sb, lens, B, H,
                                   KVH, bs, d, scale, static_cast<uint16_t*>(out), o_sb, o_sh);
    else
        decode_attention<float>(static_cast<const float*>(q), q_sb, q_sh, static_cast<const float*>(kc),
                                static_cast<const float*>(vc), c_sb, c_sh, c_st, tables, t_sb, lens, B, H, KVH, bs,
                                d, scale, static_cast<float*>(out), o_sb, o_sh);
}

// residual, h, out [rows, D] contiguous; h may be null (no add); w [D].
void nitsum_add_rms_norm(int dtype, void* residual, const void* h, const void* w, void* out, int64_t rows,
                         int64_t D, float eps) {
    if (dtype == 1)
        add_rms_norm<uint16_t>(static_cast<uint16_t*>(residual), static_cast<const uint16_t*>(h),
                               static_cast<const uint16_t*>(w), static_cast<uint16_t*>(out), rows, D, eps);
    else
        add_rms_norm<float>(static_cast<float*>(residual), static_cast<const float*>(h), static_cast<const float*>(w),
                            static_cast<float*>(out), rows, D, eps);
}

// qkv [rows, >= (H + 2 KVH) d] (row stride); cos, sin [max_len, d]; positions, slot_blocks,
// slot_offsets [rows]; caches as in nitsum_decode_attention.
void nitsum_rope_store_kv(int dtype, void* qkv, int64_t rows, int64_t row_stride, int H, int KVH, int d,
                          const void* cos, const void* sin, const int64_t* positions, void* kc, void* vc,
                          int64_t c_sb, int64_t c_sh, int64_t c_st, const int64_t* slot_blocks,
                          const int64_t* slot_offsets) {
    if (dtype == 1)
        rope_store_kv<uint16_t>(static_cast<uint16_t*>(qkv), rows, row_stride, H, KVH, d,
                                static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin), positions,
                                static_cast<uint16_t*>(kc), static_cast<uint16_t*>(vc), c_sb, c_sh, c_st,
                                slot_blocks, slot_offsets);
    else
        rope_store_kv<float>(static_cast<float*>(qkv), rows, row_stride, H, KVH, d, static_cast<const float*>(cos),
                             static_cast<const float*>(sin), positions, static_cast<float*>(kc),
                             static_cast<float*>(vc), c_sb, c_sh, c_st, slot_blocks, slot_offsets);
}

}  // extern "C"
