/* Fused CPU kernels for lpcli: the quantizers of kernels.py in one pass over memory.
 *
 * Each kernel performs, element by element, the same IEEE operations in the same order
 * as the torch kernel it replaces in kernels.py (clamps, magic-number additions, exact
 * power-of-two scalings, integer arithmetic on float32 bit patterns), so the results
 * agree bit for bit; tests/test_formats.py checks both against the oracles and against
 * each other. The build disables contraction (-ffp-contract=off): a fused multiply-add
 * would round differently.
 *
 * Stochastic rounding draws its random numbers from a counter-based hash of
 * (key, element index) instead of torch's generator: the key comes from the caller's
 * torch.Generator (one draw per call), so a seed still fixes every result, and any
 * split of the tensor into pieces gives the same numbers.
 *
 * The module takes raw addresses from Python (tensor.data_ptr()); kernels.addresses checks
 * dtype, contiguity, device and size before every call. Quantizers come as dicts of named
 * fields (kernels.native_spec), read through the field tables of parse_quantizer. The GIL
 * is released while a kernel runs so that pieces of one tensor can run on several threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

enum { NEAREST = 0, ZERO = 1, STOCHASTIC = 2 };

/* Bit casts between floats and their patterns. */
#define BIT_CAST(name, To, From)                                                          \
    static inline To name(From v) {                                                       \
        To r;                                                                             \
        memcpy(&r, &v, sizeof r);                                                         \
        return r;                                                                         \
    }
BIT_CAST(bits_of, uint32_t, float)
BIT_CAST(float_of, float, uint32_t)
BIT_CAST(bits_of_double, uint64_t, double)
BIT_CAST(double_of, double, uint64_t)

/* 32-bit finalizer with low bias (C. Wellons' "lowbias32"); two rounds over the key and
 * the 64-bit element index. The high half of the index is constant over a loop (see
 * FOR_RANDOM), so it arrives already mixed with the key as `high`. */
static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

static inline uint32_t random32(uint32_t key0, uint32_t high, uint32_t index_low) {
    return mix32(mix32(index_low ^ key0) + high);
}

/* Uniform on the multiples of 2^-24 in [0, 1), as torch's float32 uniform_. */
static inline float uniform24(uint32_t r) { return (float)(int32_t)(r >> 8) * 0x1p-24f; }

static inline float clampf(float v, float lo, float hi) {
    /* NaN fails both comparisons and passes through, as torch.clamp */
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline double clampd(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

static inline int is_nan_bits(uint32_t bits) { return (bits & 0x7fffffffU) > 0x7f800000U; }

/* The loops below are written once per rounding mode and flag (the flags are constants
 * after inlining) so that each one is branch-free and the compiler vectorizes it.
 *
 * FOR_EACH(expr): y[i] = expr for every element, with xi = x[i].
 * FOR_RANDOM(expr): the same with r = random32(...) of the element's global index
 * (offset + i); the loop is split where the index's high half changes. */
#define FOR_EACH(expr)                                                                    \
    for (int64_t i = 0; i < n; i++) {                                                     \
        const float xi = x[i];                                                            \
        y[i] = (expr);                                                                    \
    }

#define FOR_RANDOM(expr)                                                                  \
    for (int64_t done = 0; done < n;) {                                                   \
        const uint64_t first = offset + (uint64_t)done;                                   \
        const uint32_t low = (uint32_t)first, high = (uint32_t)(first >> 32) ^ key1;      \
        const uint64_t room = (1ULL << 32) - low;                                         \
        const int64_t m = (uint64_t)(n - done) < room ? n - done : (int64_t)room;         \
        const float *restrict xs = x + done;                                              \
        float *restrict ys = y + done;                                                    \
        for (int64_t i = 0; i < m; i++) {                                                 \
            const float xi = xs[i];                                                       \
            const uint32_t r = random32(key0, high, low + (uint32_t)i);                   \
            ys[i] = (expr);                                                               \
        }                                                                                 \
        done += m;                                                                        \
    }

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* --- fixed point ------------------------------------------------------------------ */

typedef struct {
    float lo, hi, step, scale;
    int mode, saturate;
    uint32_t key0, key1;
} FixedArgs;

/* round(clamp(x) * 2^F) * 2^-F; "+ 0.0f" turns -0.0 into +0.0 */
ALWAYS_INLINE float fixed_nearest(float xi, float lo, float hi, float scale, float step, int saturate) {
    return rintf((saturate ? clampf(xi, lo, hi) : xi) * scale) * step + 0.0f;
}

ALWAYS_INLINE float fixed_zero(float xi, float lo, float hi, float scale, float step, int saturate) {
    return truncf((saturate ? clampf(xi, lo, hi) : xi) * scale) * step + 0.0f;
}

ALWAYS_INLINE float fixed_stochastic(float xi, float lo, float hi, float scale, float step, int saturate,
                                     uint32_t r) {
    const float v = (saturate ? clampf(xi, lo, hi) : xi) * scale;
    const float f = floorf(v);
    return (f + (uniform24(r) < v - f ? 1.0f : 0.0f)) * step + 0.0f;
}

MULTIVERSION
static void fixed_run(const float *restrict x, float *restrict y, int64_t n, const void *args,
                      uint64_t offset) {
    const FixedArgs *a = args;
    const float lo = a->lo, hi = a->hi, step = a->step, scale = a->scale;
    const uint32_t key0 = a->key0, key1 = a->key1;
    if (a->mode == NEAREST) {
        if (a->saturate) FOR_EACH(fixed_nearest(xi, lo, hi, scale, step, 1))
        else FOR_EACH(fixed_nearest(xi, lo, hi, scale, step, 0))
    } else if (a->mode == ZERO) {
        if (a->saturate) FOR_EACH(fixed_zero(xi, lo, hi, scale, step, 1))
        else FOR_EACH(fixed_zero(xi, lo, hi, scale, step, 0))
    } else {
        if (a->saturate) FOR_RANDOM(fixed_stochastic(xi, lo, hi, scale, step, 1, r))
        else FOR_RANDOM(fixed_stochastic(xi, lo, hi, scale, step, 0, r))
    }
}

/* --- floats with 8 exponent bits: integer arithmetic on the pattern ----------------- */

typedef struct {
    int drop, mode;
    float max_value;
    uint32_t key0, key1;
} E8Args;

/* Ties to even on the kept bits; NaN as it came. With no mantissa bit left (drop 23) the
 * bit that decides a tie is the lowest exponent bit's neighbour: 1 unless zero/subnormal. */
ALWAYS_INLINE float e8_nearest(float xi, int drop, uint32_t half, uint32_t clear, int whole_mantissa) {
    const uint32_t bits = bits_of(xi);
    const uint32_t low = whole_mantissa ? (uint32_t)((bits & 0x7f800000U) != 0) : (bits >> drop) & 1U;
    const uint32_t out = (bits + low + half) & clear;
    return float_of(is_nan_bits(bits) ? bits : out);
}

ALWAYS_INLINE float e8_zero(float xi, uint32_t clear) {
    const uint32_t bits = bits_of(xi);
    return float_of(is_nan_bits(bits) ? bits : bits & clear);
}

/* Add random bits below the kept ones to |x| <= max, then cut; inf and NaN as they came. */
ALWAYS_INLINE float e8_stochastic(float xi, int drop, uint32_t clear, float max_value, uint32_t r) {
    const uint32_t bits = bits_of(xi);
    const uint32_t out = (bits_of(clampf(xi, -max_value, max_value)) + (r >> (32 - drop))) & clear;
    return float_of((bits & 0x7f800000U) == 0x7f800000U ? bits : out);
}

MULTIVERSION
static void e8_run(const float *restrict x, float *restrict y, int64_t n, const void *args,
                   uint64_t offset) {
    const E8Args *a = args;
    const int drop = a->drop;
    const uint32_t clear = ~((1U << drop) - 1U), half = (1U << (drop - 1)) - 1U;
    const float max_value = a->max_value;
    const uint32_t key0 = a->key0, key1 = a->key1;
    if (a->mode == NEAREST) {
        if (drop == 23) FOR_EACH(e8_nearest(xi, drop, half, clear, 1))
        else FOR_EACH(e8_nearest(xi, drop, half, clear, 0))
    } else if (a->mode == ZERO) {
        FOR_EACH(e8_zero(xi, clear))
    } else {
        FOR_RANDOM(e8_stochastic(xi, drop, clear, max_value, r))
    }
}

/* --- floats with E <= 7, M <= 21, nearest: the magic number in float32 -------------- */

typedef struct {
    float scale, max_value, overflow_scale, overflow_unscale;
    uint32_t low_field, high_field;
    int finite;
} NearestArgs;

ALWAYS_INLINE float float_nearest(float xi, float scale, float max_value, float up, float down,
                                  uint32_t low_field, uint32_t high_field, int finite) {
    /* (NaN becomes -max_value here; the result takes xi instead below) */
    const float above = xi > -max_value ? xi : -max_value;
    const float src = finite ? (above < max_value ? above : max_value) : xi;
    uint32_t field = bits_of(src) & 0x7f800000U;
    field = field < low_field ? low_field : (field > high_field ? high_field : field);
    const float c = float_of(field) * scale; /* exact: a power of two times 1.5 */
    float v = copysignf((src + c) - c, xi);
    if (!finite) v = (v * up) * down;
    const uint32_t bits = bits_of(xi);
    return float_of(is_nan_bits(bits) ? bits : bits_of(v));
}

MULTIVERSION
static void nearest_run(const float *restrict x, float *restrict y, int64_t n, const void *args,
                        uint64_t offset) {
    const NearestArgs *a = args;
    const float scale = a->scale, max_value = a->max_value;
    const float up = a->overflow_scale, down = a->overflow_unscale;
    const uint32_t low_field = a->low_field, high_field = a->high_field;
    if (a->finite) FOR_EACH(float_nearest(xi, scale, max_value, up, down, low_field, high_field, 1))
    else FOR_EACH(float_nearest(xi, scale, max_value, up, down, low_field, high_field, 0))
}

/* fp16, nearest: the CPU's own conversion (F16C: IEEE round to nearest even, subnormals,
 * overflow to inf), there and back, where the CPU has it; nearest_run elsewhere. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_F16C_PATH 1
__attribute__((target("avx,f16c"))) static void fp16_run(const float *restrict x, float *restrict y, int64_t n,
                                                          const void *args, uint64_t offset) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) {
        const __m128i h = _mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT);
        y[i] = _mm_cvtss_f32(_mm_cvtph_ps(h));
    }
}
static int have_f16c(void) { return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"); }
#else
#define HAVE_F16C_PATH 0
static int have_f16c(void) { return 0; }
#endif

/* --- floats with E <= 7, any rounding: exponent arithmetic ------------------------------ */

/* The parameters as kernels._general_params gives them (float32 layout for M <= 21,
 * float64 layout for M >= 22). */
typedef struct {
    double limit;
    int64_t low_field, high_field, offset_field;
    double overflow_scale, overflow_unscale, inf_scale1, inf_scale2;
    int mode, to_inf, keep_inf;
    uint32_t key0, key1;
} GeneralArgs;

/* GENERAL_ONE defines the element function in the working float T (float32 for M <= 21:
 * twice the vector width; float64 for M >= 22, where every step is exact for float32
 * inputs): round |x| (clamped) on the grid of its binade, restore the sign, then the
 * overflow and inf fix-ups of kernels._general_kernel. */
#define GENERAL_ONE(name, T, UINT, INT, to_bits, from_bits, EXP_MASK, TRUNC, FLOOR, COPYSIGN)                  \
    typedef struct {                                                                                        \
        T limit, up, down, s1, s2;                                                                          \
        INT low_field, high_field, offset_field;                                                            \
    } name##_params;                                                                                        \
    ALWAYS_INLINE float name(float x, const name##_params *g, int mode, int to_inf, int keep_inf, uint32_t r) { \
        const T src = (T)x;                                                                                 \
        const T clamped = src < -g->limit ? -g->limit : (src > g->limit ? g->limit : src);                  \
        INT field = (INT)(to_bits(clamped) & EXP_MASK);                                                     \
        field = field < g->low_field ? g->low_field : (field > g->high_field ? g->high_field : field);      \
        const T grid = from_bits((UINT)(field + g->offset_field));                                          \
        T w;                                                                                                \
        if (mode == NEAREST) {                                                                              \
            w = (clamped + grid) - grid;                                                                    \
        } else if (mode == ZERO) {                                                                          \
            w = TRUNC(clamped / grid) * grid;                                                               \
        } else {                                                                                            \
            const T q = clamped / grid, f = FLOOR(q);                                                       \
            w = (f + ((T)uniform24(r) < q - f ? (T)1 : (T)0)) * grid;                                       \
        }                                                                                                   \
        w = COPYSIGN(w, src);                                                                               \
        if (to_inf) w = (w * g->up) * g->down;                                                              \
        if (keep_inf) w = w - ((clamped - src) * g->s1) * g->s2;                                            \
        return (float)w;                                                                                    \
    }

GENERAL_ONE(general32_one, float, uint32_t, int32_t, bits_of, float_of, 0x7f800000U, truncf, floorf, copysignf)
GENERAL_ONE(general64_one, double, uint64_t, int64_t, bits_of_double, double_of, 0x7ff0000000000000ULL, trunc, floor,
            copysign)

/* One loop per rounding mode and flag, over an element function and its parameters g. */
#define GENERAL_LOOPS(one)                                                                  \
    const uint32_t key0 = a->key0, key1 = a->key1, r = 0;                                   \
    if (a->mode == NEAREST) {                                                               \
        if (a->to_inf) FOR_EACH(one(xi, &g, NEAREST, 1, 0, r))                              \
        else FOR_EACH(one(xi, &g, NEAREST, 0, 0, r))                                        \
    } else if (a->mode == ZERO) {                                                           \
        if (a->keep_inf) FOR_EACH(one(xi, &g, ZERO, 0, 1, r))                               \
        else FOR_EACH(one(xi, &g, ZERO, 0, 0, r))                                           \
    } else {                                                                                \
        if (a->keep_inf) FOR_RANDOM(one(xi, &g, STOCHASTIC, 0, 1, r))                       \
        else FOR_RANDOM(one(xi, &g, STOCHASTIC, 0, 0, r))                                   \
    }

MULTIVERSION
static void general32_run(const float *restrict x, float *restrict y, int64_t n, const void *args,
                          uint64_t offset) {
    const GeneralArgs *a = args;
    const general32_one_params g = {(float)a->limit,      (float)a->overflow_scale, (float)a->overflow_unscale,
                                    (float)a->inf_scale1, (float)a->inf_scale2,     (int32_t)a->low_field,
                                    (int32_t)a->high_field, (int32_t)a->offset_field};
    GENERAL_LOOPS(general32_one)
}

MULTIVERSION
static void general64_run(const float *restrict x, float *restrict y, int64_t n, const void *args,
                          uint64_t offset) {
    const GeneralArgs *a = args;
    const general64_one_params g = {a->limit,      a->overflow_scale, a->overflow_unscale, a->inf_scale1,
                                    a->inf_scale2, a->low_field,      a->high_field,       a->offset_field};
    GENERAL_LOOPS(general64_one)
}

/* --- the largest magnitude (dynamic fixed point) -------------------------------------- */

/* The largest |x| as a float (a NaN if x holds one), from the bit patterns: for the
 * magnitudes of floats, integer order is numeric order, and NaNs lie above inf. */
MULTIVERSION
static uint32_t absmax_bits(const float *restrict x, int64_t n) {
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t b = bits_of(x[i]) & 0x7fffffffU;
        m = b > m ? b : m;
    }
    return m;
}

/* --- MX block formats: a shared power-of-two scale per block -------------------------- */

enum { MX_FIXED = 0, MX_NEAREST = 1, MX_GENERAL = 2 };

typedef struct {
    int64_t row, block; /* the blocks run along rows of `row` elements; a row's last block may be shorter */
    int emax, element, mode;
    uint32_t key0, key1;
    FixedArgs fixed;     /* MX_FIXED: int8, symmetric, saturating */
    NearestArgs nearest; /* MX_NEAREST: float elements, nearest, saturating (finite) */
    GeneralArgs general; /* MX_GENERAL: float elements, zero or stochastic, saturating */
    int count;           /* also count into *counts (see BlockCounts) */
    float reach;         /* the element's largest value plus half its spacing there */
    struct BlockCounts *counts;
} MxArgs;

/* What an MX rounding did (the simulator's diagnostics): non-zero inputs and results (a
 * non-zero input whose result is zero was flushed within its block), inputs beyond the
 * element's reach at their block's scale (saturated), and the smallest and largest shared
 * exponent of the blocks holding a non-zero finite value (emin > emax: none). */
typedef struct BlockCounts {
    int64_t nonzero_x, nonzero_q, beyond;
    int emin, emax;
} BlockCounts;

ALWAYS_INLINE int64_t count_nonzero(const float *restrict v, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += v[i] != 0.0f;
    return c;
}

/* A block's inputs into the counts, before its results are written (y may be x). */
ALWAYS_INLINE void count_mx_block(const float *restrict x, int64_t n, float inv, float reach, int e,
                               BlockCounts *counts) {
    int64_t nonzero = 0, beyond = 0, live = 0;
    for (int64_t i = 0; i < n; i++) {
        nonzero += x[i] != 0.0f;
        beyond += fabsf(x[i] * inv) > reach; /* NaN: not beyond */
        live += x[i] != 0.0f && fabsf(x[i]) < INFINITY;
    }
    counts->nonzero_x += nonzero;
    counts->beyond += beyond;
    if (live) {
        counts->emin = e < counts->emin ? e : counts->emin;
        counts->emax = e > counts->emax ? e : counts->emax;
    }
}

/* 2^e for e in [-127, 127] (2^-127 is subnormal) */
ALWAYS_INLINE float pow2_e8m0(int e) { return e > -127 ? float_of((uint32_t)(e + 127) << 23) : float_of(1U << 22); }

/* The block's shared exponent: floor(log2) of its largest finite magnitude (the exponent
 * field: subnormals and zero give -127) minus emax, clamped to [-127, 127] (a finite amax
 * never reaches the top). The largest pattern first; only a block with inf or NaN is read
 * again, leaving them out. */
ALWAYS_INLINE int block_exponent(const float *restrict x, int64_t n, int emax) {
    int32_t m = 0; /* signed: the magnitudes' patterns fit, and signed compares vectorize */
    for (int64_t i = 0; i < n; i++) {
        const int32_t b = (int32_t)(bits_of(x[i]) & 0x7fffffffU);
        m = b > m ? b : m;
    }
    if (__builtin_expect(m >= 0x7f800000, 0)) {
        m = 0;
        for (int64_t i = 0; i < n; i++) {
            int32_t b = (int32_t)(bits_of(x[i]) & 0x7fffffffU);
            b = b < 0x7f800000 ? b : 0;
            m = b > m ? b : m;
        }
    }
    const int e = (m >> 23) - 127 - emax;
    return e < -127 ? -127 : e;
}

/* An MX float element, nearest: float_nearest for a saturating format, with the clamp
 * written so that NaN passes through it (and through the rounding) unchanged. */
ALWAYS_INLINE float mx_float_nearest(float v, float scale, float max_value, uint32_t low_field, uint32_t high_field) {
    const float below = v > max_value ? max_value : v;
    const float src = below < -max_value ? -max_value : below;
    uint32_t field = bits_of(src) & 0x7f800000U;
    field = field < low_field ? low_field : (field > high_field ? high_field : field);
    const float c = float_of(field) * scale;
    return copysignf((src + c) - c, src);
}

/* One block of n elements at (r0, b0): y = 2^e * Q(x * 2^-e), Q an element function of
 * v = xi * inv (both scalings exact, as in kernels._torch_blocks). */
#define MX_BLOCK(LOOP, element, count)                                                    \
    {                                                                                     \
        const int64_t n = (count);                                                        \
        const float *restrict x = src + r0 + b0;                                          \
        float *restrict y = dst + r0 + b0;                                                \
        const uint64_t offset = base + (uint64_t)(r0 + b0);                               \
        const int e = block_exponent(x, n, emax);                                         \
        const float inv = pow2_e8m0(-e), up = pow2_e8m0(e);                               \
        (void)offset;                                                                     \
        if (counting) count_mx_block(x, n, inv, reach, e, counts);                        \
        LOOP(element * up)                                                                \
        if (counting) counts->nonzero_q += count_nonzero(y, n);                           \
    }

/* Every block of x[0, total) (a whole number of rows); blocks of 32 with a constant count,
 * so that their loops vectorize without remainders. */
#define MX_BLOCKS(LOOP, element)                                                          \
    for (int64_t r0 = 0; r0 < total; r0 += row) {                                         \
        int64_t b0 = 0;                                                                   \
        if (block == 32)                                                                  \
            for (; b0 + 32 <= row; b0 += 32) MX_BLOCK(LOOP, element, 32)                  \
        for (; b0 < row; b0 += block) MX_BLOCK(LOOP, element, row - b0 < block ? row - b0 : block) \
    }

MULTIVERSION
static void mx_run(const float *restrict src, float *restrict dst, int64_t total, const void *args, uint64_t base) {
    const MxArgs *a = args; /* copied into locals: y must not seem to alias them */
    const uint32_t key0 = a->key0, key1 = a->key1;
    const int64_t row = a->row, block = a->block;
    const int emax = a->emax, counting = a->count;
    const float reach = a->reach;
    BlockCounts *counts = a->counts;
    if (a->element == MX_FIXED) {
        const FixedArgs *f = &a->fixed;
        const float lo = f->lo, hi = f->hi, step = f->step, scale = f->scale;
        if (a->mode == NEAREST) MX_BLOCKS(FOR_EACH, fixed_nearest(xi * inv, lo, hi, scale, step, 1))
        else if (a->mode == ZERO) MX_BLOCKS(FOR_EACH, fixed_zero(xi * inv, lo, hi, scale, step, 1))
        else MX_BLOCKS(FOR_RANDOM, fixed_stochastic(xi * inv, lo, hi, scale, step, 1, r))
    } else if (a->element == MX_NEAREST) {
        const float scale = a->nearest.scale, max_value = a->nearest.max_value;
        const uint32_t low_field = a->nearest.low_field, high_field = a->nearest.high_field;
        MX_BLOCKS(FOR_EACH, mx_float_nearest(xi * inv, scale, max_value, low_field, high_field))
    } else {
        const GeneralArgs *f = &a->general;
        const general32_one_params g = {(float)f->limit, 1.0f, 1.0f, 0.0f, 0.0f, (int32_t)f->low_field,
                                        (int32_t)f->high_field, (int32_t)f->offset_field};
        const uint32_t r = 0;
        if (a->mode == ZERO) MX_BLOCKS(FOR_EACH, general32_one(xi * inv, &g, ZERO, 0, 0, r))
        else MX_BLOCKS(FOR_RANDOM, general32_one(xi * inv, &g, STOCHASTIC, 0, 0, r))
    }
}

/* --- a quantizer chosen at run time --------------------------------------------------- */

typedef void (*RunFn)(const float *restrict, float *restrict, int64_t, const void *, uint64_t);

typedef struct {
    RunFn run; /* NULL: float32, nothing to round */
    union {
        FixedArgs fixed;
        E8Args e8;
        NearestArgs nearest;
        GeneralArgs general;
        MxArgs mx;
    } args;
} Quantizer;

static void quantize_block(const Quantizer *q, const float *restrict x, float *restrict y, int64_t n,
                           uint64_t offset) {
    if (q->run)
        q->run(x, y, n, &q->args, offset);
    else
        memcpy(y, x, (size_t)n * sizeof(float));
}

/* --- quantize and count in one pass (the simulator's quantization points) ------------- */

#define COUNT_BLOCK 1024 /* elements: a stack buffer that stays in the L1 cache */
#define COUNT_CHUNK (1 << 24) /* elements per 32-bit tally (no overflow) */

/* What a rounding is counted for, besides the three counts every call makes: */
enum {
    EXTRA_NONE = 0,
    EXTRA_NONFINITE_X = 1, /* whether x holds NaN or inf (for the non-finite watch) */
    EXTRA_NONFINITE_Q = 2, /* whether the result does */
    EXTRA_CHANGED = 3      /* whether the rounding changed any element's pattern */
};

typedef struct {
    int64_t nonzero_x, nonzero_q, saturated;
    uint32_t extra; /* the largest |pattern| of x or q (non-finite: >= inf's), or the OR of x ^ q */
} PointCounts;

/* The counts over x and its rounding q, in 32-bit lanes so that the loops vectorize (n <=
 * COUNT_CHUNK per tally): what lpcli.simulate's Counter counted with torch operations,
 * count_nonzero(x), count_nonzero(q) and count_nonzero(x > hi) + count_nonzero(x < lo) (hi,
 * lo compared as float32, as torch compares a float32 tensor with a Python float; NaN is
 * non-zero and fails both comparisons, as in torch), and the one extra the caller asked
 * for, as a maximum or an OR (one operation per element: the flags need no count). */
typedef struct {
    uint32_t nzx, nzq, sat, extra;
} Tally;

ALWAYS_INLINE void tally(Tally *t, float xi, float qi, float clo, float chi, const int extra) {
    t->nzx += xi != 0.0f ? 1 : 0;
    t->nzq += qi != 0.0f ? 1 : 0;
    t->sat += xi > chi ? 1 : 0;
    t->sat += xi < clo ? 1 : 0;
    if (extra == EXTRA_NONFINITE_X || extra == EXTRA_NONFINITE_Q) {
        const uint32_t a = bits_of(extra == EXTRA_NONFINITE_X ? xi : qi) & 0x7fffffffU;
        t->extra = a > t->extra ? a : t->extra;
    } else if (extra == EXTRA_CHANGED) {
        t->extra |= bits_of(xi) ^ bits_of(qi);
    }
}

static inline void add_tally(PointCounts *c, Tally t, const int extra) {
    c->nonzero_x += t.nzx;
    c->nonzero_q += t.nzq;
    c->saturated += t.sat;
    if (extra == EXTRA_CHANGED)
        c->extra |= t.extra;
    else if (t.extra > c->extra)
        c->extra = t.extra;
}

ALWAYS_INLINE Tally count_loop(const float *restrict x, const float *restrict q, int64_t n, float clo, float chi,
                               const int extra) {
    Tally t = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) tally(&t, x[i], q[i], clo, chi, extra);
    return t;
}

MULTIVERSION
static void count_block(const float *restrict x, const float *restrict q, int64_t n, float clo, float chi, int extra,
                        PointCounts *c) {
    switch (extra) {
    case EXTRA_NONFINITE_X: add_tally(c, count_loop(x, q, n, clo, chi, EXTRA_NONFINITE_X), EXTRA_NONFINITE_X); break;
    case EXTRA_NONFINITE_Q: add_tally(c, count_loop(x, q, n, clo, chi, EXTRA_NONFINITE_Q), EXTRA_NONFINITE_Q); break;
    case EXTRA_CHANGED: add_tally(c, count_loop(x, q, n, clo, chi, EXTRA_CHANGED), EXTRA_CHANGED); break;
    default: add_tally(c, count_loop(x, q, n, clo, chi, EXTRA_NONE), EXTRA_NONE);
    }
}

/* Fixed point, nearest or toward zero: rounding (fixed_nearest / fixed_zero, as fixed_run)
 * and counting in one loop over x, writing q to y (a distinct array), back to x (in place),
 * or nowhere. Called with constant mode, saturate and extra, so that the compiler makes one
 * vectorized loop of each combination. */
ALWAYS_INLINE float fixed_one(float xi, const FixedArgs *a, const int mode, const int saturate) {
    return mode == NEAREST ? fixed_nearest(xi, a->lo, a->hi, a->scale, a->step, saturate)
                           : fixed_zero(xi, a->lo, a->hi, a->scale, a->step, saturate);
}

ALWAYS_INLINE Tally fixed_count_into(const FixedArgs *a, const float *restrict x, float *restrict y, int64_t n,
                                     float clo, float chi, const int mode, const int saturate, const int extra) {
    Tally t = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) {
        const float xi = x[i], qi = fixed_one(xi, a, mode, saturate);
        tally(&t, xi, qi, clo, chi, extra);
        y[i] = qi;
    }
    return t;
}

ALWAYS_INLINE Tally fixed_count_case(const FixedArgs *a, float *x, float *y, int64_t n, float clo, float chi,
                                     const int mode, const int saturate, const int extra) {
    Tally t = {0, 0, 0, 0};
    if (!y) {
        for (int64_t i = 0; i < n; i++) tally(&t, x[i], fixed_one(x[i], a, mode, saturate), clo, chi, extra);
    } else if (y == x) {
        for (int64_t i = 0; i < n; i++) {
            const float xi = x[i], qi = fixed_one(xi, a, mode, saturate);
            tally(&t, xi, qi, clo, chi, extra);
            x[i] = qi;
        }
    } else {
        t = fixed_count_into(a, x, y, n, clo, chi, mode, saturate, extra);
    }
    return t;
}

#define FIXED_COUNT_EXTRA(extra)                                                                                    \
    do {                                                                                                            \
        if (a->mode == NEAREST)                                                                                     \
            t = a->saturate ? fixed_count_case(a, x, y, n, clo, chi, NEAREST, 1, extra)                             \
                            : fixed_count_case(a, x, y, n, clo, chi, NEAREST, 0, extra);                            \
        else                                                                                                        \
            t = a->saturate ? fixed_count_case(a, x, y, n, clo, chi, ZERO, 1, extra)                                \
                            : fixed_count_case(a, x, y, n, clo, chi, ZERO, 0, extra);                               \
        add_tally(c, t, extra);                                                                                     \
    } while (0)

MULTIVERSION
static void fixed_count(const FixedArgs *a, float *x, float *y, int64_t n, float clo, float chi, int extra,
                        PointCounts *c) {
    Tally t;
    switch (extra) {
    case EXTRA_NONFINITE_X: FIXED_COUNT_EXTRA(EXTRA_NONFINITE_X); break;
    case EXTRA_NONFINITE_Q: FIXED_COUNT_EXTRA(EXTRA_NONFINITE_Q); break;
    case EXTRA_CHANGED: FIXED_COUNT_EXTRA(EXTRA_CHANGED); break;
    default: FIXED_COUNT_EXTRA(EXTRA_NONE);
    }
}

/* y = Q(x) over n elements (y may be x itself, or NULL: count only). Fixed point with nearest
 * or zero rounding in one loop; every other quantizer block by block: each block is rounded
 * into a buffer, counted against x, then written to y, so every element of x is read before
 * y's is written. offset: the index of x[0] in the whole tensor (the random numbers of
 * stochastic rounding), as quantize. */
static void quantize_count_run(const Quantizer *q, float *x, float *y, int64_t n, uint64_t offset, float clo,
                               float chi, int extra, PointCounts *c) {
    if (q->run == fixed_run && q->args.fixed.mode != STOCHASTIC) {
        for (int64_t start = 0; start < n; start += COUNT_CHUNK) {
            const int64_t k = n - start < COUNT_CHUNK ? n - start : COUNT_CHUNK;
            fixed_count(&q->args.fixed, x + start, y ? y + start : NULL, k, clo, chi, extra, c);
        }
        return;
    }
    float buf[COUNT_BLOCK];
    for (int64_t start = 0; start < n; start += COUNT_BLOCK) {
        const int64_t k = n - start < COUNT_BLOCK ? n - start : COUNT_BLOCK;
        quantize_block(q, x + start, buf, k, offset + (uint64_t)start);
        count_block(x + start, buf, k, clo, chi, extra, c);
        if (y) memcpy(y + start, buf, (size_t)k * sizeof(float));
    }
}

/* --- one optimizer step on quantized weights (lpcli/optim.py, lpcli/store.py) --------- */

enum {
    STEP_KAHAN = 1, STEP_FLOAT_C = 2, STEP_MOMENTUM = 4, STEP_NESTEROV = 8, STEP_DECAY = 16, STEP_DIAG = 32,
    STEP_L2 = 64 /* Adam: decay added to the gradient before the moments */
};
#define STEP_BLOCK 128 /* elements: measured fastest of 32..2048 (benchmarks/optim.py) */

typedef struct {
    float *w, *c, *intended;
    float c_lo, c_hi; /* the compensation's range: a residue beyond it saturates */
    int flags;
    Quantizer wq, cq;
} Store;

typedef struct {
    int64_t moved, lost, dropped, saturated;
} StepCounts;

/* store.store on elements [start, start + k) (k <= STEP_BLOCK): w takes the update u in the
 * store's mode. Each quantizer reads a scratch buffer and writes the destination (never in
 * place). Counts the updates with u != 0 (moved), those among them that left the weight
 * unchanged (lost), and with Kahan the non-zero residues the compensation rounded to zero
 * (dropped) or that lay beyond its range (saturated). Inlined into each rule's kernel. */
static inline __attribute__((always_inline)) void store_block(const Store *st, int64_t start, int64_t k,
                                                              const float *restrict u, StepCounts *counts) {
    float y[STEP_BLOCK], t[STEP_BLOCK], s[STEP_BLOCK], q[STEP_BLOCK];
    const int flags = st->flags;
    float *restrict w = st->w + start;
    int64_t moved = 0, lost = 0, dropped = 0, saturated = 0;
    if (flags & STEP_KAHAN) {
        float *restrict c = st->c + start;
        const float c_lo = st->c_lo, c_hi = st->c_hi;
        if (flags & STEP_FLOAT_C) {
            for (int64_t i = 0; i < k; i++) s[i] = u[i] - c[i];
            quantize_block(&st->cq, s, y, k, 0);
        } else {
            for (int64_t i = 0; i < k; i++) y[i] = u[i] - c[i];
        }
        for (int64_t i = 0; i < k; i++) s[i] = w[i] + y[i];
        quantize_block(&st->wq, s, t, k, 0);
        for (int64_t i = 0; i < k; i++) s[i] = t[i] - w[i]; /* z */
        if (flags & STEP_FLOAT_C) {
            quantize_block(&st->cq, s, q, k, 0);
            for (int64_t i = 0; i < k; i++) s[i] = q[i] - y[i];
        } else {
            for (int64_t i = 0; i < k; i++) s[i] = s[i] - y[i];
        }
        quantize_block(&st->cq, s, c, k, 0);
        if (flags & STEP_DIAG) { /* one pass for the four counts; s holds the residue */
            for (int64_t i = 0; i < k; i++) {
                const int nonzero = u[i] != 0.0f;
                moved += nonzero;
                lost += nonzero & ((t[i] - w[i]) == 0.0f);
                dropped += (s[i] != 0.0f) & (c[i] == 0.0f);
                saturated += (s[i] > c_hi) | (s[i] < c_lo);
            }
        }
    } else {
        for (int64_t i = 0; i < k; i++) s[i] = w[i] + u[i];
        quantize_block(&st->wq, s, t, k, 0);
        if (flags & STEP_DIAG) {
            for (int64_t i = 0; i < k; i++) {
                moved += u[i] != 0.0f;
                lost += (u[i] != 0.0f) & (t[i] - w[i] == 0.0f);
            }
        }
    }
    if (flags & STEP_DIAG) {
        float *restrict sum = st->intended + start;
        for (int64_t i = 0; i < k; i++) sum[i] = sum[i] + u[i];
        counts->moved += moved;
        counts->lost += lost;
        counts->dropped += dropped;
        counts->saturated += saturated;
    }
    memcpy(w, t, (size_t)k * sizeof(float));
}

/* SGD: optim._single_step, operation for operation. */
typedef struct {
    Store store;
    float *m;
    const float *g;
    float lr, momentum, decay;
    Quantizer mq;
} SgdStep;

MULTIVERSION
static void sgd_run(const SgdStep *st, int64_t n, StepCounts *out) {
    float d[STEP_BLOCK], u[STEP_BLOCK], s[STEP_BLOCK];
    const int flags = st->store.flags;
    const float neg_lr = -st->lr, momentum = st->momentum, decay = st->decay;
    for (int64_t start = 0; start < n; start += STEP_BLOCK) {
        const int64_t k = n - start < STEP_BLOCK ? n - start : STEP_BLOCK;
        const float *restrict w = st->store.w + start;
        const float *restrict g = st->g + start;
        const float *dir = g;
        if (flags & STEP_DECAY) {
            for (int64_t i = 0; i < k; i++) d[i] = g[i] + w[i] * decay;
            dir = d;
        }
        if (flags & STEP_MOMENTUM) {
            float *restrict m = st->m + start;
            for (int64_t i = 0; i < k; i++) s[i] = m[i] * momentum;
            quantize_block(&st->mq, s, m, k, 0);
            for (int64_t i = 0; i < k; i++) s[i] = m[i] + dir[i];
            quantize_block(&st->mq, s, m, k, 0);
            if (flags & STEP_NESTEROV) {
                for (int64_t i = 0; i < k; i++) d[i] = dir[i] + m[i] * momentum;
                dir = d;
            } else {
                dir = m;
            }
        }
        for (int64_t i = 0; i < k; i++) u[i] = dir[i] * neg_lr;
        store_block(&st->store, start, k, u, out);
    }
}

/* Adam and AdamW: optim._adam_single, operation for operation (b1, b2 the debiased betas,
 * one_b1 = 1 - b1, one_b2 = 1 - b2, each already rounded to float32 by the caller). */
typedef struct {
    Store store;
    float *m, *v;
    const float *g;
    float lr, decay, b1, one_b1, b2, one_b2, eps;
    Quantizer mq, vq;
} AdamStep;

MULTIVERSION
static void adam_run(const AdamStep *st, int64_t n, StepCounts *out) {
    float d[STEP_BLOCK], u[STEP_BLOCK], s[STEP_BLOCK];
    const int flags = st->store.flags;
    const float neg_lr = -st->lr, decay = st->decay, b1 = st->b1, one_b1 = st->one_b1, b2 = st->b2,
                one_b2 = st->one_b2, eps = st->eps;
    for (int64_t start = 0; start < n; start += STEP_BLOCK) {
        const int64_t k = n - start < STEP_BLOCK ? n - start : STEP_BLOCK;
        const float *restrict w = st->store.w + start;
        const float *restrict g = st->g + start;
        float *restrict m = st->m + start;
        float *restrict v = st->v + start;
        const float *grad = g;
        if (flags & STEP_L2) {
            for (int64_t i = 0; i < k; i++) d[i] = g[i] + w[i] * decay;
            grad = d;
        }
        for (int64_t i = 0; i < k; i++) s[i] = m[i] * b1 + grad[i] * one_b1;
        quantize_block(&st->mq, s, m, k, 0);
        for (int64_t i = 0; i < k; i++) s[i] = v[i] * b2 + (grad[i] * grad[i]) * one_b2;
        quantize_block(&st->vq, s, v, k, 0);
        for (int64_t i = 0; i < k; i++) u[i] = m[i] / (sqrtf(v[i]) + eps);
        if (flags & STEP_DECAY)
            for (int64_t i = 0; i < k; i++) u[i] = u[i] + w[i] * decay;
        for (int64_t i = 0; i < k; i++) u[i] = u[i] * neg_lr;
        store_block(&st->store, start, k, u, out);
    }
}

/* --- Python bindings --------------------------------------------------------------- */

static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, nargs);
        return -1;
    }
    return 0;
}

static double as_double(PyObject *o) { return PyFloat_AsDouble(o); }
static long long as_long(PyObject *o) { return PyLong_AsLongLong(o); }
static unsigned long long as_ulong(PyObject *o) { return PyLong_AsUnsignedLongLong(o); }
static void *as_pointer(PyObject *o) { return (void *)(uintptr_t)PyLong_AsUnsignedLongLong(o); }

/* A quantizer from kernels.native_spec: a dict {"kind": name, "mode": 0..2, "key": the
 * stochastic key, and the kind's fields by name}. The tables below are the one place the
 * fields are listed; a missing or unknown field is an error that names it. */
typedef enum { T_F32, T_F64, T_INT, T_I64, T_U32 } FieldType;

typedef struct {
    const char *name;
    FieldType type;
    size_t offset;
} Field;

#define FIELD(S, name, type) {#name, type, offsetof(S, name)}
static const Field fixed_fields[] = {FIELD(FixedArgs, lo, T_F32), FIELD(FixedArgs, hi, T_F32),
                                     FIELD(FixedArgs, step, T_F32), FIELD(FixedArgs, scale, T_F32),
                                     FIELD(FixedArgs, saturate, T_INT)};
static const Field e8_fields[] = {FIELD(E8Args, drop, T_INT), FIELD(E8Args, max_value, T_F32)};
static const Field nearest_fields[] = {
    FIELD(NearestArgs, scale, T_F32),           FIELD(NearestArgs, max_value, T_F32),
    FIELD(NearestArgs, overflow_scale, T_F32),  FIELD(NearestArgs, overflow_unscale, T_F32),
    FIELD(NearestArgs, low_field, T_U32),       FIELD(NearestArgs, high_field, T_U32),
    FIELD(NearestArgs, finite, T_INT)};
static const Field general_fields[] = {
    FIELD(GeneralArgs, limit, T_F64),          FIELD(GeneralArgs, low_field, T_I64),
    FIELD(GeneralArgs, high_field, T_I64),     FIELD(GeneralArgs, offset_field, T_I64),
    FIELD(GeneralArgs, overflow_scale, T_F64), FIELD(GeneralArgs, overflow_unscale, T_F64),
    FIELD(GeneralArgs, inf_scale1, T_F64),     FIELD(GeneralArgs, inf_scale2, T_F64),
    FIELD(GeneralArgs, to_inf, T_INT),         FIELD(GeneralArgs, keep_inf, T_INT)};
static const Field mx_fields[] = {FIELD(MxArgs, row, T_I64),   FIELD(MxArgs, block, T_I64),
                                  FIELD(MxArgs, emax, T_INT),  FIELD(MxArgs, count, T_INT),
                                  FIELD(MxArgs, reach, T_F32)};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static int read_fields(PyObject *spec, const char *kind, const Field *fields, size_t count, void *out,
                       Py_ssize_t others) {
    if (PyDict_GET_SIZE(spec) != (Py_ssize_t)count + others) {
        PyErr_Format(PyExc_ValueError, "quantizer spec '%s' has %zd fields, expected %zd", kind,
                     PyDict_GET_SIZE(spec), (Py_ssize_t)count + others);
        return -1;
    }
    for (size_t i = 0; i < count; i++) {
        PyObject *v = PyDict_GetItemString(spec, fields[i].name);
        if (!v) {
            PyErr_Format(PyExc_ValueError, "quantizer spec '%s' lacks '%s'", kind, fields[i].name);
            return -1;
        }
        char *at = (char *)out + fields[i].offset;
        switch (fields[i].type) {
        case T_F32: *(float *)at = (float)PyFloat_AsDouble(v); break;
        case T_F64: *(double *)at = PyFloat_AsDouble(v); break;
        case T_INT: *(int *)at = (int)PyLong_AsLong(v); break;
        case T_I64: *(int64_t *)at = (int64_t)PyLong_AsLongLong(v); break;
        case T_U32: *(uint32_t *)at = (uint32_t)PyLong_AsUnsignedLong(v); break;
        }
        if (PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError, "quantizer spec '%s': field '%s' has the wrong type", kind, fields[i].name);
            return -1;
        }
    }
    return 0;
}

static int kind_is(PyObject *kind, const char *name) {
    return PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, name) == 0;
}

/* blocks: whether block (MX) kinds are allowed: quantize takes whole rows; quantize_count,
 * the optimizer steps and an MX block's elements round pieces that need not be rows. */
static int parse_quantizer(PyObject *spec, Quantizer *q, int blocks) {
    if (!PyDict_Check(spec)) {
        PyErr_SetString(PyExc_TypeError, "a quantizer spec is a dict with 'kind', 'mode', 'key' and its fields");
        return -1;
    }
    PyObject *kind = PyDict_GetItemString(spec, "kind"), *mode_o = PyDict_GetItemString(spec, "mode"),
             *key_o = PyDict_GetItemString(spec, "key");
    if (!kind || !mode_o || !key_o) {
        PyErr_SetString(PyExc_ValueError, "a quantizer spec needs 'kind', 'mode' and 'key'");
        return -1;
    }
    const int mode = (int)PyLong_AsLong(mode_o);
    const unsigned long long key = PyLong_AsUnsignedLongLong(key_o);
    if (PyErr_Occurred()) return -1;
    if (mode < NEAREST || mode > STOCHASTIC) {
        PyErr_Format(PyExc_ValueError, "quantizer spec: mode must be 0..2, got %d", mode);
        return -1;
    }
    const uint32_t key0 = (uint32_t)key, key1 = (uint32_t)(key >> 32);
    memset(q, 0, sizeof *q);
    if (kind_is(kind, "fp32")) {
        q->run = NULL;
        return read_fields(spec, "fp32", NULL, 0, NULL, 3);
    }
    if (kind_is(kind, "fixed")) {
        q->run = fixed_run;
        FixedArgs *a = &q->args.fixed;
        a->mode = mode, a->key0 = key0, a->key1 = key1;
        return read_fields(spec, "fixed", fixed_fields, COUNT(fixed_fields), a, 3);
    }
    if (kind_is(kind, "e8")) {
        q->run = e8_run;
        E8Args *a = &q->args.e8;
        a->mode = mode, a->key0 = key0, a->key1 = key1;
        if (read_fields(spec, "e8", e8_fields, COUNT(e8_fields), a, 3)) return -1;
        if (a->drop < 1 || a->drop > 23) {
            PyErr_SetString(PyExc_ValueError, "quantizer spec 'e8': drop must be 1..23");
            return -1;
        }
        return 0;
    }
    if (kind_is(kind, "nearest")) {
        q->run = nearest_run;
        return read_fields(spec, "nearest", nearest_fields, COUNT(nearest_fields), &q->args.nearest, 3);
    }
    if (kind_is(kind, "fp16")) { /* nearest's fields, for the CPUs without F16C */
        q->run = nearest_run;
#if HAVE_F16C_PATH
        if (have_f16c()) q->run = fp16_run;
#endif
        return read_fields(spec, "fp16", nearest_fields, COUNT(nearest_fields), &q->args.nearest, 3);
    }
    if (kind_is(kind, "general") || kind_is(kind, "general64")) {
        const int wide = kind_is(kind, "general64");
        q->run = wide ? general64_run : general32_run;
        GeneralArgs *a = &q->args.general;
        a->mode = mode, a->key0 = key0, a->key1 = key1;
        return read_fields(spec, wide ? "general64" : "general", general_fields, COUNT(general_fields), a, 3);
    }
    if (kind_is(kind, "mx") && blocks) {
        q->run = mx_run;
        MxArgs *a = &q->args.mx;
        a->mode = mode, a->key0 = key0, a->key1 = key1;
        if (read_fields(spec, "mx", mx_fields, COUNT(mx_fields), a, 4)) return -1;
        PyObject *element = PyDict_GetItemString(spec, "element");
        Quantizer e;
        if (!element) {
            PyErr_SetString(PyExc_ValueError, "quantizer spec 'mx' lacks 'element'");
            return -1;
        }
        if (parse_quantizer(element, &e, 0)) return -1;
        if (e.run == fixed_run && e.args.fixed.saturate) {
            a->element = MX_FIXED, a->fixed = e.args.fixed;
        } else if (e.run == nearest_run && e.args.nearest.finite && mode == NEAREST) {
            a->element = MX_NEAREST, a->nearest = e.args.nearest;
        } else if (e.run == general32_run && !e.args.general.to_inf && !e.args.general.keep_inf && mode != NEAREST) {
            a->element = MX_GENERAL, a->general = e.args.general;
        } else {
            PyErr_SetString(PyExc_ValueError, "quantizer spec 'mx': the element must be a saturating fixed, "
                                              "nearest or general quantizer with the block's mode");
            return -1;
        }
        if (a->row < 1 || a->block < 1 || a->emax < 0 || a->emax > 127) {
            PyErr_SetString(PyExc_ValueError, "quantizer spec 'mx': row and block must be >= 1, emax 0..127");
            return -1;
        }
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "quantizer spec: unknown kind %R%s", kind,
                 kind_is(kind, "mx") ? " (block formats round whole rows: quantize only)" : "");
    return -1;
}

/* quantize(src, dst, n, spec, offset): y = Q(x) over n elements (None, or for an MX spec
 * with "count" set, its BlockCounts as (nonzero x, nonzero y, beyond, emin, emax)); offset: the index of the
 * first element in the whole tensor (it picks the random numbers of stochastic rounding). */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Quantizer q;
    if (check_nargs(nargs, 5, "quantize") || parse_quantizer(args[3], &q, 1)) return NULL;
    const float *x = as_pointer(args[0]);
    float *y = as_pointer(args[1]);
    const long long n = as_long(args[2]);
    const uint64_t offset = as_ulong(args[4]);
    if (PyErr_Occurred()) return NULL;
    BlockCounts counts = {0, 0, 0, 1000, -1000};
    if (q.run == mx_run) q.args.mx.counts = &counts;
    Py_BEGIN_ALLOW_THREADS quantize_block(&q, x, y, n > 0 ? (int64_t)n : 0, offset);
    Py_END_ALLOW_THREADS;
    if (q.run == mx_run && q.args.mx.count)
        return Py_BuildValue("LLLii", (long long)counts.nonzero_x, (long long)counts.nonzero_q,
                             (long long)counts.beyond, counts.emin, counts.emax);
    Py_RETURN_NONE;
}

/* The store's part of a step's arguments: w, c, intended (addresses), flags, wspec, cspec,
 * c_lo, c_hi. */
static int parse_store(Store *st, PyObject *w, PyObject *c, PyObject *intended, PyObject *flags,
                       PyObject *wspec, PyObject *cspec, PyObject *c_lo, PyObject *c_hi) {
    if (parse_quantizer(wspec, &st->wq, 0) || parse_quantizer(cspec, &st->cq, 0)) return -1;
    st->w = as_pointer(w);
    st->c = as_pointer(c);
    st->intended = as_pointer(intended);
    st->flags = (int)as_long(flags);
    st->c_lo = (float)as_double(c_lo);
    st->c_hi = (float)as_double(c_hi);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *counts_tuple(const StepCounts *counts) {
    return Py_BuildValue("LLLL", (long long)counts->moved, (long long)counts->lost, (long long)counts->dropped,
                         (long long)counts->saturated);
}

/* sgd_step(w, g, m, c, intended, n, lr, momentum, decay, flags, wspec, cspec, mspec, c_lo, c_hi)
 * -> (moved, lost, dropped, saturated) */
static PyObject *py_sgd_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SgdStep st;
    if (check_nargs(nargs, 15, "sgd_step") ||
        parse_store(&st.store, args[0], args[3], args[4], args[9], args[10], args[11], args[13], args[14]) ||
        parse_quantizer(args[12], &st.mq, 0))
        return NULL;
    st.g = as_pointer(args[1]);
    st.m = as_pointer(args[2]);
    const long long n = as_long(args[5]);
    st.lr = (float)as_double(args[6]);
    st.momentum = (float)as_double(args[7]);
    st.decay = (float)as_double(args[8]);
    if (PyErr_Occurred()) return NULL;
    StepCounts counts = {0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS sgd_run(&st, n > 0 ? (int64_t)n : 0, &counts);
    Py_END_ALLOW_THREADS return counts_tuple(&counts);
}

/* adam_step(w, g, m, v, c, intended, n, lr, decay, b1, one_b1, b2, one_b2, eps, flags, wspec, cspec,
 *           mspec, vspec, c_lo, c_hi) -> (moved, lost, dropped, saturated) */
static PyObject *py_adam_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    AdamStep st;
    if (check_nargs(nargs, 21, "adam_step") ||
        parse_store(&st.store, args[0], args[4], args[5], args[14], args[15], args[16], args[19], args[20]) ||
        parse_quantizer(args[17], &st.mq, 0) || parse_quantizer(args[18], &st.vq, 0))
        return NULL;
    st.g = as_pointer(args[1]);
    st.m = as_pointer(args[2]);
    st.v = as_pointer(args[3]);
    const long long n = as_long(args[6]);
    float *scalars[] = {&st.lr, &st.decay, &st.b1, &st.one_b1, &st.b2, &st.one_b2, &st.eps};
    for (int i = 0; i < 7; i++) *scalars[i] = (float)as_double(args[7 + i]);
    if (PyErr_Occurred()) return NULL;
    StepCounts counts = {0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS adam_run(&st, n > 0 ? (int64_t)n : 0, &counts);
    Py_END_ALLOW_THREADS return counts_tuple(&counts);
}

/* quantize_count(src, dst, n, spec, offset, lo, hi, extra) -> (nonzero x, nonzero y, x beyond
 * [lo, hi], extra flag: 0 or 1); dst 0: count only (y: the rounding, unwritten); dst = src: in place. */
static PyObject *py_quantize_count(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Quantizer q;
    if (check_nargs(nargs, 8, "quantize_count") || parse_quantizer(args[3], &q, 0)) return NULL;
    float *x = as_pointer(args[0]);
    float *y = as_pointer(args[1]);
    const long long n = as_long(args[2]);
    const uint64_t offset = as_ulong(args[4]);
    const float lo = (float)as_double(args[5]), hi = (float)as_double(args[6]);
    const int extra = (int)as_long(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (extra < EXTRA_NONE || extra > EXTRA_CHANGED) {
        PyErr_SetString(PyExc_ValueError, "quantize_count: extra must be 0..3");
        return NULL;
    }
    PointCounts c = {0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS quantize_count_run(&q, x, y, n > 0 ? (int64_t)n : 0, offset, lo, hi, extra, &c);
    Py_END_ALLOW_THREADS;
    const int flag = extra == EXTRA_CHANGED ? c.extra != 0 : (extra != EXTRA_NONE && c.extra >= 0x7f800000U);
    return Py_BuildValue("LLLi", (long long)c.nonzero_x, (long long)c.nonzero_q, (long long)c.saturated, flag);
}

/* absmax(src, n) -> float */
static PyObject *py_absmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 2, "absmax")) return NULL;
    const float *x = as_pointer(args[0]);
    const long long n = as_long(args[1]);
    if (PyErr_Occurred()) return NULL;
    uint32_t m;
    Py_BEGIN_ALLOW_THREADS m = absmax_bits(x, n > 0 ? (int64_t)n : 0);
    Py_END_ALLOW_THREADS return PyFloat_FromDouble((double)float_of(m));
}

/* Accumulation in a narrow format (lpcli/accumulate.py): each addition s + p is computed
 * exactly (TwoSum: h + l == s + p) and rounded once, to nearest even, onto the
 * accumulator's grid; where h is exactly a midpoint of the grid and l is not zero, l's
 * sign decides. The same operations as accumulate.py's torch kernel, in the same order. */
typedef struct {
    int is_float;     /* 0: fixed point, step 2^-frac; 1: float, `man` mantissa bits, exponents >= emin */
    int man, emin;
    double step, inv_step; /* fixed point */
    double lo, hi;    /* the range */
    int to_inf;       /* IEEE float: overflow goes to +-inf (else it saturates) */
} AccFormat;

/* Branch-free, so that the loops over a row vectorize: every path is computed and selected.
 * swamped and saturated are incremented by 0 or 1. */
static inline double acc_add(const AccFormat *f, double s, double p, int64_t *swamped, int64_t *saturated) {
    const double h = s + p;
    const double v = h - s;
    const double l = (s - (h - v)) + (p - v);
    double step = f->step, inv = f->inv_step;
    if (f->is_float) { /* loop-invariant: the compiler unswitches it */
        int64_t e = (int64_t)((bits_of_double(h) >> 52) & 0x7ff) - 1023; /* |h| in [2^e, 2^(e+1)) */
        e = e < f->emin ? f->emin : e;
        const int64_t e_step = e - f->man + 1023, e_inv = f->man - e + 1023; /* out of range only for inf/NaN */
        step = double_of((uint64_t)(e_step > 0 ? e_step : 1) << 52);
        inv = double_of((uint64_t)(e_inv > 0 ? e_inv : 1) << 52);
    }
    const double y = h * inv; /* exact: a power of two */
    const double low = floor(y);
    const double nearest = nearbyint(y); /* ties to even */
    const double up = l > 0 ? low + 1 : low;
    const double r = (y - low == 0.5 && l != 0) ? up : nearest;
    const double rounded = r * step;
    const int over = (rounded > f->hi) | (rounded < f->lo);
    const int finite = h - h == 0;
    const double clipped = f->to_inf ? copysign(INFINITY, rounded) : (rounded > 0 ? f->hi : f->lo);
    const double kept = (f->to_inf | (h != h)) ? h : (h > 0 ? f->hi : f->lo); /* inf + p, NaN: no rounding */
    const double q = finite ? (over ? clipped : rounded) : kept;
    *saturated += over & finite;
    *swamped += (q == s) & (p != 0);
    return q;
}

/* rows x K (a) @ K x N (b) into rows x N (out), float32, row-major; work: 2N doubles. */
MULTIVERSION static void accumulate_rows(const AccFormat *f, const float *a, const float *b, float *out, int64_t rows,
                            int64_t K, int64_t N, int64_t chunk, double *work, int64_t *swamped,
                            int64_t *saturated) {
    double *sum = work, *total = work + N;
    int64_t sw = 0, sat = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *ar = a + r * K;
        for (int64_t j0 = 0; j0 < K; j0 += chunk) {
            const int64_t end = j0 + chunk < K ? j0 + chunk : K;
            const double first = ar[j0];
            for (int64_t n = 0; n < N; ++n) sum[n] = first * (double)b[j0 * N + n];
            for (int64_t k = j0 + 1; k < end; ++k) {
                const double ak = ar[k];
                const float *bk = b + k * N;
                for (int64_t n = 0; n < N; ++n) sum[n] = acc_add(f, sum[n], ak * (double)bk[n], &sw, &sat);
            }
            if (j0 == 0) {
                for (int64_t n = 0; n < N; ++n) total[n] = sum[n];
            } else {
                for (int64_t n = 0; n < N; ++n) total[n] = acc_add(f, total[n], sum[n], &sw, &sat);
            }
        }
        if (K == 1) { /* one term: the accumulator holds it rounded (not an addition: not counted) */
            int64_t none = 0;
            for (int64_t n = 0; n < N; ++n) total[n] = acc_add(f, 0.0, total[n], &none, &none);
        }
        for (int64_t n = 0; n < N; ++n) out[r * N + n] = (float)total[n];
    }
    *swamped += sw;
    *saturated += sat;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define ACC_FAST 1
/* The fast kernel: accumulate_rows' results and counts, bit for bit, with AVX2 and FMA (a
 * product of two float32 is exact in float64, so fma(a, b, s) is s + p rounded once).
 *
 * - Rounding by a constant: with c = 1.5 * 2^52 * step, (x + c) - c is x rounded to nearest
 *   even on the multiples of step where |x| < 2^51 step (beyond, it is beyond the range too:
 *   caught there). A TwoSum pair h + l is rounded once by rounding it to odd at 53 bits first
 *   (h truncated toward zero where l points that way, then its last bit set where l != 0):
 *   a grid at least 4x coarser rounds that as it would h + l itself. A zero takes h's sign,
 *   as nearbyint gives it in acc_add (which gives +0 where h is exactly -step/2 and l > 0:
 *   possible only where s is off the grid, in a chunk's first addition).
 * - Fixed point: the running sum s is on the grid, so s + c is exact and fma(a, b, s + c) - c
 *   is s + p rounded once, without TwoSum.
 * - Floats: c from h's binade. Where s is on the grid, Fast2Sum is exact if |s| >= |p| or s is
 *   a multiple of ulp(p), as every value of the format is while |p| < 2^(emin - man + 53);
 *   where that bound is above twice the range, a larger p overflows the sum anyway (fp16,
 *   e5m7, e4m3; not bf16): there Fast2Sum replaces TwoSum.
 * - Tiles of 8 rows x 8 columns (the last rows one by one): b's row is loaded once for 8 rows
 *   and 16 independent sums are in flight. The range is checked once per chunk, conservatively,
 *   from each lane's largest |sum| (fixed point) or binade (floats), compared on the high
 *   32 bits of their patterns: a chunk that came near the top of the range is summed again
 *   with careful additions, which saturate or overflow as acc_add does.
 * - Swamped additions from each chunk's third term on are counted as q == s, zero products
 *   included (s is on the grid there, so q == s when p == 0); those zero products are counted
 *   from a's and b's zeros and taken off (acc_transpose, accumulate_run).
 * - Finite operands: rows of a holding inf or NaN go to accumulate_rows, and all of a where b
 *   holds one. */
#define FAST static inline __attribute__((always_inline, target("avx2,fma")))
#define UNROLL _Pragma("GCC unroll 16")
#define EXPONENT_BITS 0x7ff0000000000000LL

typedef struct {
    const AccFormat *f;
    const float *a, *b;
    int64_t K, N, chunk, chunk_given; /* chunk: 2..K (chunk 1 is the same sum as chunk K) */
    double magic;          /* fixed point: 1.5 * 2^52 * step */
    int64_t magic_offset;  /* float: bits(1.5 * 2^(52 - man) * 2^e) - bits(2^e) */
    double half;           /* fixed point: step / 2; float: 2^-(man + 1), times 2^e */
    double min_binade;     /* float: 2^emin */
    int64_t top;           /* a tracked pattern at or above this may have left the range */
    int fast2sum;          /* float: Fast2Sum is exact where s is on the grid (see above) */
    const int64_t *weight; /* K: for a chunk's third term or later N - (b's zeros in row k), else 0 */
    int64_t b_zeros;       /* b's zeros in those rows */
    double *at;            /* 8K doubles: a tile's rows of a */
    int32_t *za;           /* K: their zeros */
    double *work;          /* 2N doubles, for accumulate_rows */
    int64_t swamped, saturated;
} AccJob;

FAST __m256d sign_of(__m256d x) { return _mm256_and_pd(x, _mm256_set1_pd(-0.0)); }

FAST __m256i max_u32(__m256i x, __m256d y) { return _mm256_max_epu32(x, _mm256_castpd_si256(y)); }

/* h + l (h = s + a * b rounded, l its error) rounded once with the constant c (see above). */
FAST __m256d round_pair(__m256d h, __m256d l, __m256d c) {
    const __m256d zero = _mm256_setzero_pd();
    const __m256i toward_zero = _mm256_castpd_si256(_mm256_cmp_pd(h * l, zero, _CMP_LT_OQ)); /* -1 */
    const __m256i sticky = _mm256_srli_epi64(_mm256_castpd_si256(_mm256_cmp_pd(l, zero, _CMP_NEQ_OQ)), 63);
    const __m256d odd =
        _mm256_castsi256_pd(_mm256_or_si256(_mm256_add_epi64(_mm256_castpd_si256(h), toward_zero), sticky));
    return _mm256_or_pd((odd + c) - c, sign_of(h));
}

/* TwoSum of s and a * b: h and its error l (Fast2Sum where fast2sum: see above). */
FAST __m256d two_sum(__m256d s, __m256d a, __m256d b, __m256d *l, int fast2sum) {
    const __m256d h = _mm256_fmadd_pd(a, b, s), z = h - s;
    *l = _mm256_fmsub_pd(a, b, z);
    if (!fast2sum) *l += s - (h - z);
    return h;
}

/* acc_add's +0 where h == -step/2 and l > 0 (its tie rule takes floor(-0.5) + 1). */
FAST __m256d tie_zero(__m256d r, __m256d h, __m256d l, __m256d neg_half) {
    const __m256d edge = _mm256_and_pd(_mm256_cmp_pd(h, neg_half, _CMP_EQ_OQ),
                                       _mm256_cmp_pd(l, _mm256_setzero_pd(), _CMP_GT_OQ));
    return _mm256_andnot_pd(sign_of(edge), r);
}

/* The kinds of addition: s on the grid and the result in range (the bulk of a chunk, a total plus
 * a chunk sum); s anywhere, the result in range (a chunk's first addition); anything, as acc_add
 * (careful: saturation, overflow, a total already at +-inf). */
enum { ON_GRID = 0, ANYWHERE = 1, CAREFUL = 2 };

/* acc_add on 4 lanes: s + a * b rounded once onto the accumulator's grid, for the kind of addition
 * (saturated or overflowed only where careful, counted in *saturated). Tracked in *top: |result|
 * (fixed point) or the binade of s + a * b (floats). */
FAST __m256d add4(const AccJob *j, __m256d s, __m256d a, __m256d b, __m256i *top, __m256i *saturated, int kind,
                  int is_float, int fast2sum) {
    __m256d q, l, h, neg_half;
    if (!is_float && kind == ON_GRID) {
        const __m256d c = _mm256_set1_pd(j->magic);
        h = _mm256_fmadd_pd(a, b, s);
        q = _mm256_or_pd(_mm256_fmadd_pd(a, b, s + c) - c, sign_of(h));
    } else if (!is_float) {
        h = two_sum(s, a, b, &l, 0);
        q = round_pair(h, l, _mm256_set1_pd(j->magic));
        neg_half = _mm256_set1_pd(-j->half);
    } else {
        h = two_sum(s, a, b, &l, kind == ON_GRID && fast2sum);
        const __m256d binade = _mm256_castsi256_pd( /* 2^e: |h| in [2^e, 2^(e+1)), e >= emin */
            max_u32(_mm256_and_si256(_mm256_castpd_si256(h), _mm256_set1_epi64x(EXPONENT_BITS)),
                    _mm256_set1_pd(j->min_binade)));
        *top = max_u32(*top, binade);
        const __m256d c = _mm256_castsi256_pd( /* times 1.5 * 2^(52 - man), on the exponent field */
            _mm256_add_epi64(_mm256_castpd_si256(binade), _mm256_set1_epi64x(j->magic_offset)));
        q = round_pair(h, l, c);
        neg_half = -(binade * _mm256_set1_pd(j->half));
    }
    if (kind != ON_GRID) q = tie_zero(q, h, l, neg_half);
    if (kind == CAREFUL) { /* beyond the range: saturated, or +-inf; where s was +-inf, h is kept */
        const __m256d lo = _mm256_set1_pd(j->f->lo), hi = _mm256_set1_pd(j->f->hi), zero = _mm256_setzero_pd();
        const __m256d over = _mm256_or_pd(_mm256_cmp_pd(q, hi, _CMP_GT_OQ), _mm256_cmp_pd(q, lo, _CMP_LT_OQ));
        const __m256d finite = _mm256_cmp_pd(h - h, zero, _CMP_EQ_OQ);
        const __m256d clipped = j->f->to_inf ? _mm256_or_pd(_mm256_set1_pd(INFINITY), sign_of(q))
                                             : _mm256_blendv_pd(lo, hi, _mm256_cmp_pd(q, zero, _CMP_GT_OQ));
        q = _mm256_blendv_pd(h, _mm256_blendv_pd(q, clipped, over), finite);
        *saturated = _mm256_sub_epi64(*saturated, _mm256_castpd_si256(_mm256_and_pd(over, finite)));
    }
    if (!is_float) *top = max_u32(*top, _mm256_andnot_pd(_mm256_set1_pd(-0.0), q));
    return q;
}

FAST int64_t sum_lanes(__m256i x) {
    const __m128i y = _mm_add_epi64(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    return _mm_cvtsi128_si64(y) + _mm_extract_epi64(y, 1);
}

/* Whether a tracked pattern reached j->top (compared on the high 32 bits). */
FAST int near_top(const AccJob *j, const __m256i top[2], int V) {
    const __m256i limit = _mm256_set1_epi64x(j->top);
    __m256i reached = _mm256_setzero_si256();
    UNROLL for (int v = 0; v < V; ++v)
        reached = _mm256_or_si256(reached, _mm256_cmpeq_epi32(_mm256_max_epu32(top[v], limit), top[v]));
    return (_mm256_movemask_ps(_mm256_castsi256_ps(reached)) & 0xaa) != 0;
}

/* The lanes of a tile's vectors that hold columns (the rest: padding) and the masks of their floats. */
FAST void tile_lanes(int64_t width, __m256i lanes[2], __m128i load_mask[2]) {
    UNROLL for (int v = 0; v < 2; ++v) {
        load_mask[v] = _mm_cmpgt_epi32(_mm_set1_epi32((int)(width - 4 * v)), _mm_setr_epi32(0, 1, 2, 3));
        lanes[v] = _mm256_cmpgt_epi64(_mm256_set1_epi64x(width - 4 * v), _mm256_setr_epi64x(0, 1, 2, 3));
    }
}

/* b's row k, columns 4v .. 4v + 3 as doubles; the last vector masked: it may end the row. */
FAST __m256d load_b(const float *b, int64_t k, int64_t N, int v, int V, const __m128i load_mask[2]) {
    const float *p = b + k * N + 4 * v;
    return _mm256_cvtps_pd(v == V - 1 ? _mm_maskload_ps(p, load_mask[v]) : _mm_loadu_ps(p));
}

/* The slow paths of a tile (acc_tile), with every addition careful, as acc_add makes it. The
 * chunk [j0, end): its sums into s (R x 2 vectors), counted; whether they came near the top. */
__attribute__((noinline, target("avx2,fma"))) static int careful_chunk(AccJob *j, const double *at, const float *b,
                                                                       int64_t width, int64_t j0, int64_t end, int R,
                                                                       int V, __m256d *s, int is_float) {
    const __m256d zero = _mm256_setzero_pd();
    __m256i lanes[2];
    __m128i masks[2];
    tile_lanes(width, lanes, masks);
    __m256i swamped[2], saturated[2], top[2];
    for (int v = 0; v < V; ++v) {
        swamped[v] = saturated[v] = top[v] = _mm256_setzero_si256();
        const __m256d bk = load_b(b, j0, j->N, v, V, masks);
        for (int r = 0; r < R; ++r) s[2 * r + v] = _mm256_broadcast_sd(at + j0 * R + r) * bk;
    }
    for (int64_t k = j0 + 1; k < end; ++k)
        for (int v = 0; v < V; ++v) {
            const __m256d bk = load_b(b, k, j->N, v, V, masks);
            for (int r = 0; r < R; ++r) {
                const __m256d ak = _mm256_broadcast_sd(at + k * R + r), sv = s[2 * r + v];
                const __m256d q = add4(j, sv, ak, bk, &top[v], &saturated[v], CAREFUL, is_float, 0);
                __m256d same = _mm256_cmp_pd(q, sv, _CMP_EQ_OQ);
                if (k == j0 + 1) same = _mm256_and_pd(same, _mm256_cmp_pd(ak * bk, zero, _CMP_NEQ_OQ));
                swamped[v] = _mm256_sub_epi64(swamped[v], _mm256_castpd_si256(same));
                s[2 * r + v] = q;
            }
        }
    for (int v = 0; v < V; ++v) {
        j->swamped += sum_lanes(_mm256_and_si256(swamped[v], lanes[v]));
        j->saturated += sum_lanes(_mm256_and_si256(saturated[v], lanes[v]));
    }
    return near_top(j, top, V);
}

/* ... and total + chunk sum s (R x 2 vectors each), counted. */
__attribute__((noinline, target("avx2,fma"))) static void careful_totals(AccJob *j, int64_t width, int R, int V,
                                                                         __m256d *total, const __m256d *s,
                                                                         int is_float) {
    __m256i lanes[2], top = _mm256_setzero_si256();
    __m128i masks[2];
    tile_lanes(width, lanes, masks);
    for (int v = 0; v < V; ++v) {
        __m256i swamped = _mm256_setzero_si256(), saturated = _mm256_setzero_si256();
        for (int r = 0; r < R; ++r) {
            const __m256d t = total[2 * r + v], sv = s[2 * r + v];
            const __m256d q = add4(j, t, sv, _mm256_set1_pd(1.0), &top, &saturated, CAREFUL, is_float, 0);
            const __m256d same = _mm256_and_pd(_mm256_cmp_pd(q, t, _CMP_EQ_OQ),
                                               _mm256_cmp_pd(sv, _mm256_setzero_pd(), _CMP_NEQ_OQ));
            swamped = _mm256_sub_epi64(swamped, _mm256_castpd_si256(same));
            total[2 * r + v] = q;
        }
        j->swamped += sum_lanes(_mm256_and_si256(swamped, lanes[v]));
        j->saturated += sum_lanes(_mm256_and_si256(saturated, lanes[v]));
    }
}

/* Columns col0 .. col0 + width - 1 (width <= 4V) of rows row0 .. row0 + R - 1; at: those rows'
 * a as doubles, k-major (at[k * R + r]). A chunk whose sums came near the top of the range is
 * summed again with careful additions, and so are the next chunks while they do. */
FAST void acc_tile(AccJob *j, const double *at, int64_t row0, int64_t col0, int64_t width, float *out, const int R,
                   const int V, const int is_float, const int fast2sum) {
    const int64_t K = j->K, N = j->N, chunk = j->chunk;
    const float *b = j->b + col0;
    const __m256d zero = _mm256_setzero_pd(), lo = _mm256_set1_pd(j->f->lo), hi = _mm256_set1_pd(j->f->hi);
    /* arrays of the largest sizes (8 x 2): constant sizes, so that they are kept in registers */
    __m128i load_mask[2]; /* the last vector's lanes beyond width are padding (zeros) */
    __m256i lanes[2];
    tile_lanes(width, lanes, load_mask);
#define ADD(s, a, b, kind) add4(j, s, a, b, &top[v], &saturated[v], kind, is_float, fast2sum)
#define EACH UNROLL for (int r = 0; r < R; ++r) UNROLL for (int v = 0; v < V; ++v)
    __m256d s[8][2], total[8][2], bk[2], spill[16], spill_total[16];
    EACH total[r][v] = zero; /* set by the first chunk */
    int careful = 0;
    for (int64_t j0 = 0; j0 < K; j0 += chunk) {
        const int64_t end = j0 + chunk < K ? j0 + chunk : K;
        __m256i swamped[2], saturated[2], top[2];
        if (!careful) {
            UNROLL for (int v = 0; v < V; ++v) {
                swamped[v] = saturated[v] = top[v] = _mm256_setzero_si256();
                bk[v] = load_b(b, j0, N, v, V, load_mask);
            }
            EACH s[r][v] = _mm256_broadcast_sd(at + j0 * R + r) * bk[v];
            if (end - j0 > 1) { /* the first addition: s is off the grid */
                UNROLL for (int v = 0; v < V; ++v) bk[v] = load_b(b, j0 + 1, N, v, V, load_mask);
                UNROLL for (int r = 0; r < R; ++r) {
                    const __m256d ak = _mm256_broadcast_sd(at + (j0 + 1) * R + r);
                    UNROLL for (int v = 0; v < V; ++v) {
                        const __m256d q = ADD(s[r][v], ak, bk[v], ANYWHERE);
                        const __m256d same = _mm256_and_pd(_mm256_cmp_pd(q, s[r][v], _CMP_EQ_OQ),
                                                           _mm256_cmp_pd(ak * bk[v], zero, _CMP_NEQ_OQ));
                        swamped[v] = _mm256_sub_epi64(swamped[v], _mm256_castpd_si256(same));
                        s[r][v] = q;
                    }
                }
            }
            for (int64_t k = j0 + 2; k < end; ++k) { /* the bulk: s on the grid */
                UNROLL for (int v = 0; v < V; ++v) bk[v] = load_b(b, k, N, v, V, load_mask);
                UNROLL for (int r = 0; r < R; ++r) {
                    const __m256d ak = _mm256_broadcast_sd(at + k * R + r);
                    UNROLL for (int v = 0; v < V; ++v) {
                        const __m256d q = ADD(s[r][v], ak, bk[v], ON_GRID);
                        const __m256d same = _mm256_cmp_pd(q, s[r][v], _CMP_EQ_OQ);
                        swamped[v] = _mm256_sub_epi64(swamped[v], _mm256_castpd_si256(same));
                        s[r][v] = q;
                    }
                }
            }
            careful = near_top(j, top, V);
            if (!careful)
                UNROLL for (int v = 0; v < V; ++v) j->swamped += sum_lanes(_mm256_and_si256(swamped[v], lanes[v]));
        }
        if (careful) { /* this chunk (again) with careful additions, and the next while it comes near the top */
            careful = careful_chunk(j, at, b, width, j0, end, R, V, spill, is_float);
            EACH s[r][v] = spill[2 * r + v];
        }
        if (j0 == 0) {
            EACH total[r][v] = s[r][v];
            continue;
        }
        /* total + chunk sum (total on the grid, or saturated, or +-inf): careful where out of range */
        __m256d in_range = _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), q[8][2];
        UNROLL for (int v = 0; v < V; ++v) swamped[v] = _mm256_setzero_si256();
        EACH {
            q[r][v] = ADD(total[r][v], s[r][v], _mm256_set1_pd(1.0), ON_GRID);
            in_range = _mm256_and_pd(in_range, _mm256_and_pd(_mm256_cmp_pd(q[r][v], lo, _CMP_GE_OQ),
                                                             _mm256_cmp_pd(q[r][v], hi, _CMP_LE_OQ)));
            const __m256d same = _mm256_and_pd(_mm256_cmp_pd(q[r][v], total[r][v], _CMP_EQ_OQ),
                                               _mm256_cmp_pd(s[r][v], zero, _CMP_NEQ_OQ));
            swamped[v] = _mm256_sub_epi64(swamped[v], _mm256_castpd_si256(same));
        }
        if (_mm256_movemask_pd(in_range) == 0xf) {
            UNROLL for (int v = 0; v < V; ++v) j->swamped += sum_lanes(_mm256_and_si256(swamped[v], lanes[v]));
            EACH total[r][v] = q[r][v];
        } else {
            EACH {
                spill[2 * r + v] = s[r][v];
                spill_total[2 * r + v] = total[r][v];
            }
            careful_totals(j, width, R, V, spill_total, spill, is_float);
            EACH total[r][v] = spill_total[2 * r + v];
        }
    }
#undef EACH
#undef ADD
    UNROLL for (int r = 0; r < R; ++r) UNROLL for (int v = 0; v < V; ++v) {
        float *o = out + (row0 + r) * N + col0 + 4 * v;
        const __m128 x = _mm256_cvtpd_ps(total[r][v]);
        if (v == V - 1)
            _mm_maskstore_ps(o, load_mask[v], x);
        else
            _mm_storeu_ps(o, x);
    }
}

#define ACC_TILES(is_float, fast2sum)                                                                      \
    if (R == 8)                                                                                            \
        width > 4 ? acc_tile(j, at, row0, col0, width, out, 8, 2, is_float, fast2sum)                      \
                  : acc_tile(j, at, row0, col0, width, out, 8, 1, is_float, fast2sum);                     \
    else                                                                                                   \
        width > 4 ? acc_tile(j, at, row0, col0, width, out, 1, 2, is_float, fast2sum)                      \
                  : acc_tile(j, at, row0, col0, width, out, 1, 1, is_float, fast2sum);

/* R rows of a (row stride K) into at as doubles, k-major (at[k * R + r]), and their zeros per k
 * into za; returns whether they hold inf or NaN. */
__attribute__((target("avx2"))) static int acc_transpose(const float *a, int64_t K, int R, double *at, int32_t *za) {
    int64_t k = 0;
    __m128i top = _mm_setzero_si128(); /* the largest |a| pattern */
    if (R % 4 == 0) {
        const __m128i abs_bits = _mm_set1_epi32(0x7fffffff);
        for (; k + 4 <= K; k += 4) for (int g = 0; g < R; g += 4) {
            const float *ag = a + g * K;
            double *atg = at + g;
            __m128 x0 = _mm_loadu_ps(ag + k), x1 = _mm_loadu_ps(ag + K + k), x2 = _mm_loadu_ps(ag + 2 * K + k),
                   x3 = _mm_loadu_ps(ag + 3 * K + k);
            const __m128 zero = _mm_setzero_ps();
            __m128i zeros = _mm_add_epi32(_mm_add_epi32(_mm_castps_si128(_mm_cmpeq_ps(x0, zero)),
                                                        _mm_castps_si128(_mm_cmpeq_ps(x1, zero))),
                                          _mm_add_epi32(_mm_castps_si128(_mm_cmpeq_ps(x2, zero)),
                                                        _mm_castps_si128(_mm_cmpeq_ps(x3, zero))));
            const __m128i counted = g ? _mm_loadu_si128((const __m128i *)(za + k)) : _mm_setzero_si128();
            _mm_storeu_si128((__m128i *)(za + k), _mm_sub_epi32(counted, zeros));
            top = _mm_max_epu32(top, _mm_and_si128(_mm_castps_si128(x0), abs_bits));
            top = _mm_max_epu32(top, _mm_and_si128(_mm_castps_si128(x1), abs_bits));
            top = _mm_max_epu32(top, _mm_and_si128(_mm_castps_si128(x2), abs_bits));
            top = _mm_max_epu32(top, _mm_and_si128(_mm_castps_si128(x3), abs_bits));
            _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
            _mm256_storeu_pd(atg + R * k, _mm256_cvtps_pd(x0));
            _mm256_storeu_pd(atg + R * (k + 1), _mm256_cvtps_pd(x1));
            _mm256_storeu_pd(atg + R * (k + 2), _mm256_cvtps_pd(x2));
            _mm256_storeu_pd(atg + R * (k + 3), _mm256_cvtps_pd(x3));
        }
    }
    uint32_t top_bits = 0;
    for (; k < K; ++k) {
        za[k] = 0;
        for (int r = 0; r < R; ++r) {
            const float x = a[r * K + k];
            const uint32_t bits = bits_of(x) & 0x7fffffffU;
            at[k * R + r] = x;
            za[k] += x == 0;
            top_bits = bits > top_bits ? bits : top_bits;
        }
    }
    top = _mm_max_epu32(top, _mm_set1_epi32((int)top_bits));
    return _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(_mm_max_epu32(top, _mm_set1_epi32(0x7f800000)), top))) != 0;
}

/* rows x K (a) @ K x N (b) into out, as accumulate_rows, K >= 2, finite b. */
__attribute__((target("avx2,fma"))) static void accumulate_fast(AccJob *j, float *out, int64_t rows) {
    const int64_t K = j->K, N = j->N;
    double *at = j->at;
    for (int64_t row0 = 0; row0 < rows;) {
        const int R = rows - row0 >= 8 ? 8 : 1; /* the last rows one by one */
        if (acc_transpose(j->a + row0 * K, K, R, at, j->za)) {
            accumulate_rows(j->f, j->a + row0 * K, j->b, out + row0 * N, R, K, N, j->chunk_given, j->work, &j->swamped,
                            &j->saturated);
            row0 += R;
            continue;
        }
        for (int64_t col0 = 0; col0 < N; col0 += 8) {
            const int64_t width = N - col0 < 8 ? N - col0 : 8;
            if (!j->f->is_float) {
                ACC_TILES(0, 0)
            } else if (j->fast2sum) {
                ACC_TILES(1, 1)
            } else {
                ACC_TILES(1, 0)
            }
        }
        int64_t zeros = R * j->b_zeros; /* the bulk's zero products in these rows */
        for (int64_t k = 0; k < K; ++k) zeros += j->za[k] * j->weight[k];
        j->swamped -= zeros;
        row0 += R;
    }
}
#endif

/* accumulate_rows, or the fast kernel where it applies: 0, or -1 where memory ran out. */
static int accumulate_run(const AccFormat *f, const float *a, const float *b, float *out, int64_t rows, int64_t K,
                          int64_t N, int64_t chunk, int64_t *swamped, int64_t *saturated) {
    double *work = malloc(sizeof(double) * 2 * (size_t)(N > 0 ? N : 1));
    if (!work) return -1;
#ifdef ACC_FAST
    const double range = f->hi < -f->lo ? f->hi : -f->lo; /* |sums| up to it stay in range */
    const int fits = f->is_float ? f->man <= 50 && f->emin >= -1000 : f->hi <= ldexp(f->step, 50);
    if (K >= 2 && rows > 0 && N > 0 && range > 0 && fits && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && absmax_bits(b, K * N) < 0x7f800000U) {
        double *at = malloc(sizeof(double) * 8 * (size_t)K);
        int32_t *za = malloc(sizeof(int32_t) * (size_t)K);
        int64_t *weight = malloc(sizeof(int64_t) * (size_t)K);
        if (!at || !za || !weight) {
            free(at);
            free(za);
            free(weight);
            free(work);
            return -1;
        }
        AccJob j = {f, a, b, K, N, chunk == 1 || chunk > K ? K : chunk, chunk};
        j.weight = weight;
        j.at = at;
        j.za = za;
        j.work = work;
        for (int64_t k = 0; k < K; ++k) {
            int64_t zb = 0;
            for (int64_t n = 0; n < N; ++n) zb += b[k * N + n] == 0;
            const int bulk = k % j.chunk >= 2;
            weight[k] = bulk ? N - zb : 0;
            j.b_zeros += bulk ? zb : 0;
        }
        if (f->is_float) {
            j.magic_offset = (int64_t)(bits_of_double(ldexp(1.5, 52 - f->man)) - bits_of_double(1.0));
            j.half = ldexp(1.0, -f->man - 1);
            j.min_binade = ldexp(1.0, f->emin);
            j.top = (int64_t)(bits_of_double(range) & EXPONENT_BITS); /* the top binade */
            j.fast2sum = ldexp(1.0, f->emin - f->man + 53) > 2 * f->hi;
        } else {
            j.magic = ldexp(1.5, 52) * f->step;
            j.half = f->step / 2;
            j.top = (int64_t)bits_of_double(range);
        }
        accumulate_fast(&j, out, rows);
        *swamped += j.swamped;
        *saturated += j.saturated;
        free(at);
        free(za);
        free(weight);
        free(work);
        return 0;
    }
#endif
    accumulate_rows(f, a, b, out, rows, K, N, chunk, work, swamped, saturated);
    free(work);
    return 0;
}

/* accumulate(a, b, out, rows, K, N, chunk, is_float, frac, man, emin, lo, hi, to_inf)
 * -> (swamped, saturated) */
static PyObject *py_accumulate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 14, "accumulate")) return NULL;
    const float *a = as_pointer(args[0]), *b = as_pointer(args[1]);
    float *out = as_pointer(args[2]);
    const int64_t rows = as_long(args[3]), K = as_long(args[4]), N = as_long(args[5]), chunk = as_long(args[6]);
    AccFormat f;
    f.is_float = (int)as_long(args[7]);
    const int frac = (int)as_long(args[8]);
    f.man = (int)as_long(args[9]);
    f.emin = (int)as_long(args[10]);
    f.lo = as_double(args[11]);
    f.hi = as_double(args[12]);
    f.to_inf = (int)as_long(args[13]);
    f.step = ldexp(1.0, -frac);
    f.inv_step = ldexp(1.0, frac);
    if (PyErr_Occurred()) return NULL;
    if (rows < 0 || K < 1 || N < 0 || chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "accumulate: bad sizes");
        return NULL;
    }
    int64_t swamped = 0, saturated = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS status = accumulate_run(&f, a, b, out, rows, K, N, chunk, &swamped, &saturated);
    Py_END_ALLOW_THREADS if (status) return PyErr_NoMemory();
    return Py_BuildValue("LL", (long long)swamped, (long long)saturated);
}

static PyMethodDef methods[] = {
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL, "Round n floats onto a format."},
    {"sgd_step", (PyCFunction)(void (*)(void))py_sgd_step, METH_FASTCALL, "One SGD step on quantized weights."},
    {"adam_step", (PyCFunction)(void (*)(void))py_adam_step, METH_FASTCALL, "One Adam step on quantized weights."},
    {"quantize_count", (PyCFunction)(void (*)(void))py_quantize_count, METH_FASTCALL,
     "Round n floats onto a format and count non-zero and saturated values (and one flag)."},
    {"absmax", (PyCFunction)(void (*)(void))py_absmax, METH_FASTCALL, "Largest magnitude (NaN if any)."},
    {"accumulate", (PyCFunction)(void (*)(void))py_accumulate, METH_FASTCALL,
     "A matrix product summed in a narrow accumulator."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels for lpcli.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
