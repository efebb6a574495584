// Nitsum's CPU kernels: the decode-step work that eager PyTorch does in many small ops or
// through copies. Built on first use by services/engine/cpu_kernels.py (g++ -O3 -march=native
// -fopenmp) and called through ctypes with raw pointers; no PyTorch headers, so a build takes a
// second. OpenMP resolves to the libgomp that torch has already loaded, so both share one thread
// pool, and the wrappers pass torch's thread count (nitsum_set_threads).
//
// dtype codes: 0 = float32, 1 = bfloat16. Every kernel computes in float32. Residual add + norm,
// rotary + KV write and SiLU * up round where the reference (transformers' eager Llama) rounds;
// sums run in their own order (so a result can differ from the reference's by one rounding step),
// and softmax and SiLU use a polynomial exp.
// Head sizes up to kMaxHeadDim (cpu_kernels.MAX_HEAD_DIM checks it before any call).

#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define NITSUM_AVX512_BF16 1
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace {

constexpr int kMaxHeadDim = 512;

// Threads for the kernels' parallel regions: torch's count, which Python hands over (an OpenMP
// thread's own default would be every core whatever torch.set_num_threads said).
int g_threads = 1;

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

// Token t's row of a sequence whose blocks are `table`.
template <typename T>
inline const T* row_at(const T* cache, int64_t c_sb, int64_t c_st, const int64_t* table, int64_t t, int bs) {
    return cache + table[t / bs] * c_sb + (t % bs) * c_st;
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

// Each of the G rows of sc [G, len] becomes its softmax, in place.
inline void softmax_rows(float* sc, int G, int64_t len) {
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
}

// acc[g] = sum_t p[g, t] v_t for `heads` heads (p rows of stride len), any head size: each value
// row converted to float32 once for all heads, the sums kept in memory.
template <typename T>
int values_generic(int heads, const T* vc, int64_t c_sb, int64_t c_st, const int64_t* table, int64_t len, int bs,
                   int d, const float* p, float* acc) {
    float row[kMaxHeadDim];
    std::memset(acc, 0, sizeof(float) * heads * d);
    for_each_token(vc, c_sb, c_st, table, len, bs, [&](int64_t t, const T* vr) {
#pragma omp simd
        for (int i = 0; i < d; ++i) row[i] = Elem<T>::load(vr[i]);
        for (int g = 0; g < heads; ++g) {
            const float w = p[g * len + t];
            float* a = acc + g * d;
#pragma omp simd
            for (int i = 0; i < d; ++i) a[i] += w * row[i];
        }
    });
    return heads;
}

// Decode attention of one sequence and one KV head over its blocks: the G query heads that
// share the KV head. Two passes over the keys' scores (max, then exp and sum), one over values.
template <typename T>
void decode_one(const T* q, int64_t q_sh, const T* kc, const T* vc, int64_t c_sb, int64_t c_st,
                const int64_t* table, int64_t len, int G, int bs, int d, float scale, T* out, int64_t o_sh,
                float* qf, float* sc, float* acc) {
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i) qf[g * d + i] = Elem<T>::load(q[g * q_sh + i]) * scale;
    float row[kMaxHeadDim];  // one key row in float32, converted once for all G heads
    for_each_token(kc, c_sb, c_st, table, len, bs, [&](int64_t t, const T* kr) {
#pragma omp simd
        for (int i = 0; i < d; ++i) row[i] = Elem<T>::load(kr[i]);
        for (int g = 0; g < G; ++g) {
            const float* qg = qf + g * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < d; ++i) s += qg[i] * row[i];
            sc[g * len + t] = s;
        }
    });
    softmax_rows(sc, G, len);
    values_generic(G, vc, c_sb, c_st, table, len, bs, d, sc, acc);
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i) out[g * o_sh + i] = Elem<T>::store(acc[g * d + i]);
}

#ifdef NITSUM_AVX512_BF16
// r[i] = the sum of v[i]'s 16 lanes: a transpose-and-add tree, 3 instructions a vector.
inline __m512 sum_lanes16(const __m512* v) {
    __m512 quads[4];
    for (int q = 0; q < 4; ++q) {  // 4 vectors -> per 128-bit lane, their 4 lane sums
        const __m512* w = v + 4 * q;
        const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
        const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
        quads[q] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 s2 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s1, s2, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s1, s2, _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __m512 load_bf16x16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// acc[g] = sum_t p[g, t] v_t for GC heads (p rows of stride len), the GC x NV accumulators held
// in registers across all tokens: the common head sizes (64, 128) and up to 16 accumulators.
template <int NV, int GC>
void values_fixed(const uint16_t* vc, int64_t c_sb, int64_t c_st, const int64_t* table, int64_t len, int bs,
                  const float* p, float* acc) {
    __m512 a[GC][NV];
    for (int g = 0; g < GC; ++g)
        for (int j = 0; j < NV; ++j) a[g][j] = _mm512_setzero_ps();
    for_each_token(vc, c_sb, c_st, table, len, bs, [&](int64_t t, const uint16_t* vr) {
        __m512 v[NV];
        for (int j = 0; j < NV; ++j) v[j] = load_bf16x16(vr + 16 * j);
        for (int g = 0; g < GC; ++g) {
            const __m512 w = _mm512_set1_ps(p[g * len + t]);
            for (int j = 0; j < NV; ++j) a[g][j] = _mm512_fmadd_ps(w, v[j], a[g][j]);
        }
    });
    for (int g = 0; g < GC; ++g)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + g * NV * 16 + 16 * j, a[g][j]);
}

// values_fixed for min(heads, MAX_GC) heads; returns how many it did.
template <int NV, int MAX_GC>
int values_in_registers(int heads, const uint16_t* vc, int64_t c_sb, int64_t c_st, const int64_t* table,
                        int64_t len, int bs, const float* p, float* acc) {
    static_assert(MAX_GC <= 4);
    const int gc = heads < MAX_GC ? heads : MAX_GC;
    switch (gc) {
        case 1: values_fixed<NV, 1>(vc, c_sb, c_st, table, len, bs, p, acc); break;
        case 2: values_fixed<NV, 2>(vc, c_sb, c_st, table, len, bs, p, acc); break;
        case 3: values_fixed<NV, (MAX_GC >= 3 ? 3 : 1)>(vc, c_sb, c_st, table, len, bs, p, acc); break;
        default: values_fixed<NV, MAX_GC>(vc, c_sb, c_st, table, len, bs, p, acc); break;
    }
    return gc;
}

// Keys and values sit in blocks of a few KiB scattered over the cache, where the hardware
// prefetcher barely helps: the kernel asks for rows [t0, t1) of a sequence ahead of their use.
inline void prefetch_rows(const uint16_t* cache, int64_t c_sb, int64_t c_st, const int64_t* table, int64_t t0,
                          int64_t t1, int64_t len, int bs, int d) {
    for (int64_t t = t0; t < t1 && t < len; ++t) {
        const uint16_t* row = row_at(cache, c_sb, c_st, table, t, bs);
        for (int j = 0; j < d; j += 32) _mm_prefetch(reinterpret_cast<const char*>(row + j), _MM_HINT_T0);
    }
}

// decode_one for bfloat16 with head_dim % 32 == 0: q.k with the bf16 dot-product instruction
// (exact products, float32 sums), 16 keys' dots reduced at once; values in float32 FMAs.
void decode_one_bf16(const uint16_t* q, int64_t q_sh, const uint16_t* kc, const uint16_t* vc, int64_t c_sb,
                     int64_t c_st, const int64_t* table, int64_t len, int G, int bs, int d, float scale,
                     uint16_t* out, int64_t o_sh, float* sc, float* acc) {
    const int nk = d / 32;
    const __m512 vscale = _mm512_set1_ps(scale);
    const uint16_t* rows[16];
    __m512 part[16];
    constexpr int64_t kAhead = 48;  // keys asked for this many rows ahead; values as keys are done
    prefetch_rows(kc, c_sb, c_st, table, 0, kAhead, len, bs, d);
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
        const int n = len - t0 < 16 ? static_cast<int>(len - t0) : 16;
        prefetch_rows(kc, c_sb, c_st, table, t0 + kAhead, t0 + kAhead + 16, len, bs, d);
        prefetch_rows(vc, c_sb, c_st, table, t0, t0 + 16, len, bs, d);
        for (int i = 0; i < n; ++i) rows[i] = row_at(kc, c_sb, c_st, table, t0 + i, bs);
        for (int g = 0; g < G; ++g) {
            const uint16_t* qg = q + g * q_sh;
            for (int i = 0; i < 16; ++i) part[i] = _mm512_setzero_ps();
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < nk; ++j)
                    part[i] = _mm512_dpbf16_ps(part[i], (__m512bh)_mm512_loadu_si512(qg + 32 * j),
                                               (__m512bh)_mm512_loadu_si512(rows[i] + 32 * j));
            _mm512_mask_storeu_ps(sc + g * len + t0, static_cast<__mmask16>((1u << n) - 1u),
                                  _mm512_mul_ps(sum_lanes16(part), vscale));
        }
    }
    softmax_rows(sc, G, len);
    for (int g0 = 0; g0 < G;) {
        const float* p = sc + g0 * len;
        float* a = acc + g0 * d;
        if (d == 64)
            g0 += values_in_registers<4, 4>(G - g0, vc, c_sb, c_st, table, len, bs, p, a);
        else if (d == 128)
            g0 += values_in_registers<8, 2>(G - g0, vc, c_sb, c_st, table, len, bs, p, a);
        else
            g0 += values_generic(G - g0, vc, c_sb, c_st, table, len, bs, d, p, a);
    }
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i) out[g * o_sh + i] = f32_to_bf16(acc[g * d + i]);
}
// y = x W^T (+ b) for one row x [K] and W [N, K] row-major (K % 32 == 0): a batch-1 decode
// step's linear layers, which only stream W. Each thread reads its rows in order, two
// accumulators a row, asking for the lines 32 rows ahead (prefetches past the end of W are
// harmless: they never fault); 16 rows' sums are reduced together.
void gemv_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, int64_t N, int64_t K, uint16_t* y) {
    const int64_t blocks = (N + 15) / 16;
#pragma omp parallel for num_threads(g_threads) schedule(static) if (N * K >= 65536)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t n0 = blk * 16;
        const int rows = N - n0 < 16 ? static_cast<int>(N - n0) : 16;
        const uint16_t* w0 = w + n0 * K;
        __m512 acc[16];
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
        for (int r = 0; r < rows; ++r) {
            const uint16_t* wr = w0 + r * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                _mm_prefetch(reinterpret_cast<const char*>(wr + k + 32 * K), _MM_HINT_T1);
                _mm_prefetch(reinterpret_cast<const char*>(wr + k + 32 + 32 * K), _MM_HINT_T1);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(wr + k));
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32),
                                      (__m512bh)_mm512_loadu_si512(wr + k + 32));
            }
            if (k < K) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(wr + k));
            acc[r] = _mm512_add_ps(a0, a1);
        }
        alignas(64) float sums[16];
        _mm512_store_ps(sums, sum_lanes16(acc));
        for (int r = 0; r < rows; ++r)
            y[n0 + r] = f32_to_bf16(bias == nullptr ? sums[r] : sums[r] + bf16_to_f32(bias[n0 + r]));
    }
}
#endif

template <typename T>
void decode_attention(const T* q, int64_t q_sb, int64_t q_sh, const T* kc, const T* vc, int64_t c_sb,
                      int64_t c_sh, int64_t c_st, const int64_t* tables, int64_t t_sb, const int64_t* lens,
                      int B, int H, int KVH, int bs, int d, float scale, T* out, int64_t o_sb, int64_t o_sh) {
    const int G = H / KVH;
    int64_t max_len = 1;
    for (int b = 0; b < B; ++b) max_len = lens[b] > max_len ? lens[b] : max_len;
    const int tasks = B * KVH;
#pragma omp parallel num_threads(g_threads) if (tasks > 1)
    {
        float* buf = static_cast<float*>(std::malloc(sizeof(float) * (2 * G * d + G * max_len)));
#pragma omp for schedule(static)
        for (int task = 0; task < tasks; ++task) {
            const int b = task / KVH, h = task % KVH;
#ifdef NITSUM_AVX512_BF16
            if constexpr (sizeof(T) == 2) {
                if (d % 32 == 0) {
                    decode_one_bf16(q + b * q_sb + h * G * q_sh, q_sh, kc + h * c_sh, vc + h * c_sh, c_sb, c_st,
                                    tables + b * t_sb, lens[b], G, bs, d, scale, out + b * o_sb + h * G * o_sh,
                                    o_sh, buf + 2 * G * d, buf + G * d);
                    continue;
                }
            }
#endif
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
#pragma omp parallel for num_threads(g_threads) schedule(static) if (rows * D >= 65536)
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
// token written into its (block, offset) position in the paged cache. Rounds like the reference:
// T(T(x * cos) + T(rotate_half(x) * sin)), with cos and sin already in T.
template <typename T>
void rope_store_kv(T* qkv, int64_t rows, int64_t row_stride, int H, int KVH, int d, const T* cos, const T* sin,
                   const int64_t* positions, T* kc, T* vc, int64_t c_sb, int64_t c_sh, int64_t c_st,
                   const int64_t* cache_blocks, const int64_t* cache_offsets) {
    const int half = d / 2;
#pragma omp parallel for num_threads(g_threads) schedule(static) if (rows >= 16)
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
        const int64_t base = cache_blocks[r] * c_sb + cache_offsets[r] * c_st;
        for (int h = 0; h < KVH; ++h) {
            std::memcpy(kc + base + h * c_sh, row + static_cast<int64_t>(H + h) * d, sizeof(T) * d);
            std::memcpy(vc + base + h * c_sh, row + static_cast<int64_t>(H + KVH + h) * d, sizeof(T) * d);
        }
    }
}

// out = T(T(silu(gate)) * up) for each row of the gate+up projection [rows, 2 * inter] (gate
// first), rounding as the reference's two ops do.
template <typename T>
void silu_mul(const T* gate_up, int64_t rows, int64_t inter, T* out) {
#pragma omp parallel for num_threads(g_threads) schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up + r * 2 * inter;
        const T* u = g + inter;
        T* o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) {
            const float x = Elem<T>::load(g[i]);
            const float act = Elem<T>::round(x / (1.0f + exp_approx(-x)));
            o[i] = Elem<T>::store(act * Elem<T>::load(u[i]));
        }
    }
}

}  // namespace

extern "C" {

void nitsum_set_threads(int threads) { g_threads = threads > 0 ? threads : 1; }

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

// qkv [rows, >= (H + 2 KVH) d] (row stride); cos, sin [max_len, d]; positions, cache_blocks,
// cache_offsets [rows]; caches as in nitsum_decode_attention.
void nitsum_rope_store_kv(int dtype, void* qkv, int64_t rows, int64_t row_stride, int H, int KVH, int d,
                          const void* cos, const void* sin, const int64_t* positions, void* kc, void* vc,
                          int64_t c_sb, int64_t c_sh, int64_t c_st, const int64_t* cache_blocks,
                          const int64_t* cache_offsets) {
    if (dtype == 1)
        rope_store_kv<uint16_t>(static_cast<uint16_t*>(qkv), rows, row_stride, H, KVH, d,
                                static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin), positions,
                                static_cast<uint16_t*>(kc), static_cast<uint16_t*>(vc), c_sb, c_sh, c_st,
                                cache_blocks, cache_offsets);
    else
        rope_store_kv<float>(static_cast<float*>(qkv), rows, row_stride, H, KVH, d, static_cast<const float*>(cos),
                             static_cast<const float*>(sin), positions, static_cast<float*>(kc),
                             static_cast<float*>(vc), c_sb, c_sh, c_st, cache_blocks, cache_offsets);
}

// gate_up [rows, 2 * inter] contiguous, out [rows, inter] contiguous.
void nitsum_silu_mul(int dtype, const void* gate_up, int64_t rows, int64_t inter, void* out) {
    if (dtype == 1)
        silu_mul<uint16_t>(static_cast<const uint16_t*>(gate_up), rows, inter, static_cast<uint16_t*>(out));
    else
        silu_mul<float>(static_cast<const float*>(gate_up), rows, inter, static_cast<float*>(out));
}

// y [N] = x [K] . W [N, K]^T (+ bias [N]); bfloat16, K % 32 == 0. Returns 0 where this build has
// no AVX512-BF16 (the caller then uses its own path).
int nitsum_gemv_bf16(const void* x, const void* w, const void* bias, int64_t N, int64_t K, void* y) {
#ifdef NITSUM_AVX512_BF16
    gemv_bf16(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), static_cast<const uint16_t*>(bias),
              N, K, static_cast<uint16_t*>(y));
    return 1;
#else
    (void)x, (void)w, (void)bias, (void)N, (void)K, (void)y;
    return 0;
#endif
}

int nitsum_has_avx512_bf16() {
#ifdef NITSUM_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
