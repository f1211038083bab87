/* LMF's render MLP, fused: every output pixel runs its ensemble neighbours' modulated MLPs
 * with all activations in registers and adds them up by LIIF's area weights.
 *
 * PyTorch has to write each 16-wide layer's activations out to memory and read them back
 * (a matmul, then a multiply-add, then a ReLU), so the tiny render MLP is memory-bound there.
 * Here a batch of BATCH queries goes through all layers at once: the work becomes the MACs.
 *
 * Each latent's row of the latent table holds, as the latent MLP wrote it, the scales
 * (depth x HIDDEN), then the shifts (depth x HIDDEN), then the model's code. A modulated layer
 * k is h = relu((W_k h + b_k) * (1 + scale_k) + shift_k), the official formula. Layer 0:
 *   AFFINE  (LM-LIIF): its input is (code, rel_y, rel_x, cell); the code's part is per latent
 *                      (`base`, HIDDEN floats), the cell's per grid (`extra` holds wy, wx, then it),
 *                      so W_0 h + b_0 = (base + cell) + rel_y wy + rel_x wx.
 *   FOURIER (LM-LTE):  the code holds coef (HIDDEN) and freq (HIDDEN, (y, x) pairs):
 *                      z = freq_y rel_y + freq_x rel_x + phase, input = coef * [cos(pi z), sin(pi z)],
 *                      then layer 0 is an ordinary modulated layer.
 * Every query is computed on its own, in a fixed order, so the result of a pixel never
 * depends on which tile, block or thread computed it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h> /* at any HIDDEN: the stores and the blend use vectors too */
#endif

#ifndef HIDDEN
#define HIDDEN 16
#endif
#define BATCH 16
#ifndef SLOTS
#define SLOTS 4
#endif
#define AFFINE 0
#define FOURIER 1
#if BATCH % SLOTS
#error "SLOTS must divide BATCH: the modulated layers work in whole groups of SLOTS queries"
#endif
#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* What is written for a normalised value v (the `units` of the output). */
enum { NORMALISED = 0, UNIT = 1, CODES8 = 2, CODES16 = 3 };

/* Store v at out[at] in `units`: NORMALISED as it is; UNIT (v + 1) * 0.5 (PyTorch's add then mul);
 * CODES8 / CODES16 that clamped to [0, 1], times 255 / 65535 and rounded half to even into an 8- or
 * 16-bit sample: the float32 operations numpy and PyTorch do to make an image's samples, so the bytes
 * are theirs, written in the rendering pass instead of three more passes over every pixel. */
static inline void store(void *out, int64_t at, float v, int units) {
    if (units == NORMALISED) {
        ((float *)out)[at] = v;
        return;
    }
    const float u = (v + 1.0f) * 0.5f;
    if (units == UNIT) {
        ((float *)out)[at] = u;
        return;
    }
    /* (v + 1) * 0.5 is exact, so clamping v + 1 to [0, 2] and multiplying by half the peak rounds as
     * clamping u to [0, 1] and multiplying by the peak; as max and min, which vectorise */
    const float twice = v + 1.0f, positive = twice > 0.0f ? twice : 0.0f; /* NaN -> 0 */
    const float clamped = positive < 2.0f ? positive : 2.0f;
    if (units == CODES8)
        ((uint8_t *)out)[at] = (uint8_t)nearbyintf(clamped * 127.5f);
    else
        ((uint16_t *)out)[at] = (uint16_t)nearbyintf(clamped * 32767.5f);
}

/* The latent model: see the header. `layers` matrix layers, the first being modulated
 * layer `first` (1 for AFFINE, whose layer 0 is the input stage; 0 for FOURIER). */
typedef struct {
    const float *table;
    int64_t row, depth, first, layers, code;
    const float *base, *extra, *weights, *biases;
} Model;

/* acc = h W + b for a batch. Queries go SLOTS at a time, so their accumulators (SLOTS x
 * HIDDEN floats) stay in vector registers while each weight row is read once per group.
 * With AVX2 and FMA the registers are named: left to the compiler, the fully unrolled loops
 * spilled accumulators and read h back through unaligned vector loads (a store-forwarding
 * stall per input); here each h[s][i] is one broadcast load. Both forms do the same fused
 * multiply-adds in the same order (i ascending from b or 0), so they give the same bits (checked
 * at width 16; at width 8 GCC vectorises the plain loops otherwise, and they stay). */
#if defined(__AVX512F__) && HIDDEN == 16
/* With AVX-512 a hidden row is one register: the whole batch's sixteen accumulators and the weight
 * row take 17 of the 32 registers, and each multiply-add covers the whole row (half the instructions
 * of the AVX2 form below). Sixteen chains of 16 multiply-adds, not eight: with eight, their latency
 * (4 cycles each) matched the two FMA units' throughput, so a layer's bias, gain and ReLU stalled the
 * units (the x4 render 5-7% slower on an Intel Xeon). Same fused multiply-adds in the same order, so
 * the same bits. */
#define WIDE_SLOTS 16
#if BATCH % WIDE_SLOTS
#error "WIDE_SLOTS must divide BATCH"
#endif
/* a += h W for `slots` queries from s0 (a constant where it is inlined, so the loops unroll). */
static inline __attribute__((always_inline)) void group_linear(__m512 *a, int slots, float h[BATCH][HIDDEN], int s0,
                                                               const float *w) {
    for (int i = 0; i < HIDDEN; i++) {
        __m512 wv = _mm512_loadu_ps(w + i * HIDDEN);
        __asm__("" : "+v"(wv));
        for (int s = 0; s < slots; s++) a[s] = _mm512_fmadd_ps(wv, _mm512_set1_ps(h[s0 + s][i]), a[s]);
    }
}

static inline __attribute__((always_inline)) void linear_group(float acc[BATCH][HIDDEN], float h[BATCH][HIDDEN],
                                                               const float *w, const float *b, int s0, int slots) {
    __m512 a[WIDE_SLOTS];
    for (int s = 0; s < slots; s++) a[s] = b ? _mm512_loadu_ps(b) : _mm512_setzero_ps();
    group_linear(a, slots, h, s0, w);
    for (int s = 0; s < slots; s++) _mm512_storeu_ps(acc[s0 + s], a[s]);
}

/* Only the rows asked for: the output layer runs on a batch's 4 pixels (taps 2), where whole groups
 * did two to four times its multiply-adds. */
static void linear(float acc[BATCH][HIDDEN], float h[BATCH][HIDDEN], const float *w, const float *b, int rows) {
    int s0 = 0;
    for (; s0 + WIDE_SLOTS <= rows; s0 += WIDE_SLOTS) linear_group(acc, h, w, b, s0, WIDE_SLOTS);
    for (; s0 + 4 <= rows; s0 += 4) linear_group(acc, h, w, b, s0, 4);
    for (; s0 < rows; s0++) linear_group(acc, h, w, b, s0, 1);
}

static void modulated_layers(float h[BATCH][HIDDEN], const int64_t lat[BATCH], const Model *m) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    const float *rows[BATCH];
    for (int s = 0; s < BATCH; s++) rows[s] = m->table + lat[s] * m->row + m->first * HIDDEN;
    const int64_t to_shift = m->depth * HIDDEN;
    for (int64_t l = 0; l < m->layers; l++) {
        const __m512 bias = _mm512_loadu_ps(m->biases + l * HIDDEN);
        for (int s0 = 0; s0 < BATCH; s0 += WIDE_SLOTS) {
            __m512 a[WIDE_SLOTS];
            for (int s = 0; s < WIDE_SLOTS; s++) a[s] = _mm512_setzero_ps();
            group_linear(a, WIDE_SLOTS, h, s0, m->weights + l * HIDDEN * HIDDEN);
            for (int s = 0; s < WIDE_SLOTS; s++) {
                const float *scale = rows[s0 + s] + l * HIDDEN;
                const float *shift = scale + to_shift;
                const __m512 gain = _mm512_add_ps(one, _mm512_loadu_ps(scale));
                const __m512 out = _mm512_fmadd_ps(_mm512_add_ps(a[s], bias), gain, _mm512_loadu_ps(shift));
                _mm512_storeu_ps(h[s0 + s], _mm512_max_ps(out, zero));
            }
        }
    }
}

/* mix = sum of weight[s] h[s] over a pixel's `count` queries, one fused multiply-add per value from 0, as
 * the AVX2 and plain forms do it (in registers: through memory it was a chain of stores and loads). */
static inline void ensemble(float mix[HIDDEN], const float *weight, float h[][HIDDEN], int count) {
    __m512 acc = _mm512_setzero_ps();
    for (int s = 0; s < count; s++) acc = _mm512_fmadd_ps(_mm512_set1_ps(weight[s]), _mm512_loadu_ps(h[s]), acc);
    _mm512_storeu_ps(mix, acc);
}
#elif defined(__AVX2__) && defined(__FMA__) && HIDDEN == 16
#define LANES (HIDDEN / 8)
/* a += h W for queries s0 .. s0 + SLOTS - 1. Each weight row is loaded once into registers for
 * the group (the empty asm keeps GCC from folding the load into every FMA, a load per query that
 * made the loop load-bound: 20% of the render time). */
static inline __attribute__((always_inline)) void group_linear(__m256 a[SLOTS][LANES], int slots,
                                                               float h[BATCH][HIDDEN], int s0, const float *w) {
    for (int i = 0; i < HIDDEN; i++) {
        __m256 wv[LANES];
        for (int v = 0; v < LANES; v++) {
            wv[v] = _mm256_loadu_ps(w + i * HIDDEN + 8 * v);
            __asm__("" : "+x"(wv[v]));
        }
        for (int s = 0; s < slots; s++) {
            const __m256 hi = _mm256_broadcast_ss(&h[s0 + s][i]);
            for (int v = 0; v < LANES; v++) a[s][v] = _mm256_fmadd_ps(wv[v], hi, a[s][v]);
        }
    }
}

static inline __attribute__((always_inline)) void linear_group(float acc[BATCH][HIDDEN], float h[BATCH][HIDDEN],
                                                               const float *w, const float *b, int s0, int slots) {
    __m256 a[SLOTS][LANES];
    for (int s = 0; s < slots; s++)
        for (int v = 0; v < LANES; v++) a[s][v] = b ? _mm256_loadu_ps(b + 8 * v) : _mm256_setzero_ps();
    group_linear(a, slots, h, s0, w);
    for (int s = 0; s < slots; s++)
        for (int v = 0; v < LANES; v++) _mm256_storeu_ps(acc[s0 + s] + 8 * v, a[s][v]);
}

/* Only the rows asked for (a batch's last pixels need not fill a group). */
static void linear(float acc[BATCH][HIDDEN], float h[BATCH][HIDDEN], const float *w, const float *b, int rows) {
    int s0 = 0;
    for (; s0 + SLOTS <= rows; s0 += SLOTS) linear_group(acc, h, w, b, s0, SLOTS);
    for (; s0 < rows; s0++) linear_group(acc, h, w, b, s0, 1);
}

/* The modulated layers in place, SLOTS queries at a time: the accumulators get the bias, gain and
 * shift and the ReLU while still in registers: the plain form's operations in its order, the
 * multiply-add fused as GCC contracts it there, so the same bits. */
static void modulated_layers(float h[BATCH][HIDDEN], const int64_t lat[BATCH], const Model *m) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const float *rows[BATCH];
    for (int s = 0; s < BATCH; s++) rows[s] = m->table + lat[s] * m->row + m->first * HIDDEN;
    const int64_t to_shift = m->depth * HIDDEN;
    for (int64_t l = 0; l < m->layers; l++) {
        const float *bias = m->biases + l * HIDDEN;
        for (int s0 = 0; s0 < BATCH; s0 += SLOTS) {
            __m256 a[SLOTS][LANES];
            for (int s = 0; s < SLOTS; s++)
                for (int v = 0; v < LANES; v++) a[s][v] = _mm256_setzero_ps();
            group_linear(a, SLOTS, h, s0, m->weights + l * HIDDEN * HIDDEN);
            for (int s = 0; s < SLOTS; s++) {
                const float *scale = rows[s0 + s] + l * HIDDEN;
                const float *shift = scale + to_shift;
                for (int v = 0; v < LANES; v++) {
                    const __m256 gain = _mm256_add_ps(one, _mm256_loadu_ps(scale + 8 * v));
                    const __m256 sum = _mm256_add_ps(a[s][v], _mm256_loadu_ps(bias + 8 * v));
                    const __m256 out = _mm256_fmadd_ps(sum, gain, _mm256_loadu_ps(shift + 8 * v));
                    _mm256_storeu_ps(h[s0 + s] + 8 * v, _mm256_max_ps(out, zero));
                }
            }
        }
    }
}

static inline void ensemble(float mix[HIDDEN], const float *weight, float h[][HIDDEN], int count) {
    __m256 acc[LANES];
    for (int v = 0; v < LANES; v++) acc[v] = _mm256_setzero_ps();
    for (int s = 0; s < count; s++)
        for (int v = 0; v < LANES; v++)
            acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(weight[s]), _mm256_loadu_ps(h[s] + 8 * v), acc[v]);
    for (int v = 0; v < LANES; v++) _mm256_storeu_ps(mix + 8 * v, acc[v]);
}
#else
static inline void ensemble(float mix[HIDDEN], const float *weight, float h[][HIDDEN], int count) {
    for (int o = 0; o < HIDDEN; o++) mix[o] = 0.0f;
    for (int s = 0; s < count; s++)
        for (int o = 0; o < HIDDEN; o++) mix[o] += weight[s] * h[s][o];
}

static void linear(float acc[BATCH][HIDDEN], float h[BATCH][HIDDEN], const float *w, const float *b, int rows) {
    for (int s0 = 0; s0 < rows; s0 += SLOTS) {
        const int slots = rows - s0 < SLOTS ? rows - s0 : SLOTS; /* only the rows asked for */
        float a[SLOTS][HIDDEN];
        for (int s = 0; s < slots; s++)
            for (int o = 0; o < HIDDEN; o++) a[s][o] = b ? b[o] : 0.0f;
        for (int i = 0; i < HIDDEN; i++)
            for (int s = 0; s < slots; s++) {
                float hi = h[s0 + s][i];
                for (int o = 0; o < HIDDEN; o++) a[s][o] += w[i * HIDDEN + o] * hi;
            }
        for (int s = 0; s < slots; s++)
            for (int o = 0; o < HIDDEN; o++) acc[s0 + s][o] = a[s][o];
    }
}

static void modulated_layers(float h[BATCH][HIDDEN], const int64_t lat[BATCH], const Model *m) {
    for (int64_t l = 0; l < m->layers; l++) {
        float acc[BATCH][HIDDEN];
        const int64_t k = m->first + l;
        const float *bias = m->biases + l * HIDDEN;
        linear(acc, h, m->weights + l * HIDDEN * HIDDEN, NULL, BATCH);
        for (int s = 0; s < BATCH; s++) {
            const float *scale = m->table + lat[s] * m->row + k * HIDDEN;
            const float *shift = scale + m->depth * HIDDEN;
            for (int o = 0; o < HIDDEN; o++) {
                float v = (acc[s][o] + bias[o]) * (1.0f + scale[o]) + shift[o];
                h[s][o] = v > 0.0f ? v : 0.0f;
            }
        }
    }
}
#endif

static void input_stage(float h[HIDDEN], const Model *m, int kind, int64_t lat, float ry, float rx) {
    const float *row = m->table + lat * m->row;
    if (kind == AFFINE) {
        const float *base = m->base + lat * HIDDEN, *wy = m->extra, *wx = wy + HIDDEN, *cell = wx + HIDDEN;
        const float *scale = row, *shift = row + m->depth * HIDDEN;
        for (int o = 0; o < HIDDEN; o++) {
            const float own = base[o] + cell[o]; /* the latent's code and the grid's cell */
            float v = (own + ry * wy[o] + rx * wx[o]) * (1.0f + scale[o]) + shift[o];
            h[o] = v > 0.0f ? v : 0.0f;
        }
        return;
    }
    const int half = HIDDEN / 2;
    const float *coef = row + m->code, *freq = coef + HIDDEN, *phase = m->extra;
    for (int j = 0; j < half; j++) {
        float z = (float)M_PI * (freq[2 * j] * ry + freq[2 * j + 1] * rx + phase[j]);
        h[j] = coef[j] * cosf(z);
        h[j + half] = coef[j + half] * sinf(z);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && HIDDEN >= 4
/* Four pixels side by side in an interleaved canvas (12 values from out[at]): store()'s operations and
 * bits, as one vector (stored one by one, they took about 6% of the render). */
static void store_four(void *out, int64_t at, float rgb[][HIDDEN], float skip_add[][3], int units) {
    const __mmask16 twelve = 0x0fff;
    const __m512i pair = _mm512_setr_epi32(0, 1, 2, 16, 17, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i four = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 16, 17, 18, 19, 20, 21, 0, 0, 0, 0);
    const __mmask16 three = 0x7; /* a row's first three values: rows narrower than 16 end sooner */
    const __m512 first = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(three, rgb[0]), pair,
                                                _mm512_maskz_loadu_ps(three, rgb[1]));
    const __m512 second = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(three, rgb[2]), pair,
                                                 _mm512_maskz_loadu_ps(three, rgb[3]));
    __m512 v = _mm512_permutex2var_ps(first, four, second);
    if (skip_add)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(twelve, skip_add[0]));
    const __m512 one = _mm512_set1_ps(1.0f);
    if (units == NORMALISED || units == UNIT) {
        if (units == UNIT)
            v = _mm512_mul_ps(_mm512_add_ps(v, one), _mm512_set1_ps(0.5f));
        _mm512_mask_storeu_ps((float *)out + at, twelve, v);
        return;
    }
    const __m512 twice = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, one), _mm512_setzero_ps()), _mm512_set1_ps(2.0f));
    const __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(twice, _mm512_set1_ps(units == CODES8 ? 127.5f : 32767.5f)));
    if (units == CODES8)
        _mm_mask_storeu_epi8((uint8_t *)out + at, twelve, _mm512_cvtepi32_epi8(codes));
    else
        _mm256_mask_storeu_epi16((uint16_t *)out + at, twelve, _mm512_cvtepi32_epi16(codes));
}
#define HAS_STORE_FOUR 1
#elif defined(__AVX2__) && HIDDEN >= 4
/* The same with AVX2: the four pixels' first three values, shuffled into three vectors of four. */
static void store_four(void *out, int64_t at, float rgb[][HIDDEN], float skip_add[][3], int units) {
    const __m128 p0 = _mm_loadu_ps(rgb[0]), p1 = _mm_loadu_ps(rgb[1]), p2 = _mm_loadu_ps(rgb[2]);
    const __m128 p3 = _mm_loadu_ps(rgb[3]);
    __m128 v[3] = {_mm_blend_ps(p0, _mm_shuffle_ps(p1, p1, 0), 8),                            /* r0 g0 b0 r1 */
                   _mm_shuffle_ps(p1, p2, _MM_SHUFFLE(1, 0, 2, 1)),                            /* g1 b1 r2 g2 */
                   _mm_blend_ps(_mm_shuffle_ps(p3, p3, _MM_SHUFFLE(2, 1, 0, 0)), _mm_shuffle_ps(p2, p2, 0xaa), 1)};
    const __m128 one = _mm_set1_ps(1.0f);
    for (int j = 0; j < 3; j++) {
        if (skip_add)
            v[j] = _mm_add_ps(v[j], _mm_loadu_ps(skip_add[0] + 4 * j));
        if (units == UNIT)
            v[j] = _mm_mul_ps(_mm_add_ps(v[j], one), _mm_set1_ps(0.5f));
        if (units == NORMALISED || units == UNIT)
            _mm_storeu_ps((float *)out + at + 4 * j, v[j]);
    }
    if (units == NORMALISED || units == UNIT)
        return;
    const __m128 peak = _mm_set1_ps(units == CODES8 ? 127.5f : 32767.5f);
    __m128i codes[3];
    for (int j = 0; j < 3; j++) {
        const __m128 twice = _mm_min_ps(_mm_max_ps(_mm_add_ps(v[j], one), _mm_setzero_ps()), _mm_set1_ps(2.0f));
        codes[j] = _mm_cvtps_epi32(_mm_mul_ps(twice, peak));
    }
    /* the codes lie within the sample's range, so the saturating packs only narrow them */
    const __m128i low = _mm_packus_epi32(codes[0], codes[1]), high = _mm_packus_epi32(codes[2], codes[2]);
    if (units == CODES8) {
        const __m128i bytes = _mm_packus_epi16(low, high);
        const int32_t last = _mm_extract_epi32(bytes, 2);
        _mm_storel_epi64((__m128i *)((uint8_t *)out + at), bytes);
        memcpy((uint8_t *)out + at + 8, &last, 4);
        return;
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)out + at), low);
    _mm_storel_epi64((__m128i *)((uint16_t *)out + at + 8), high);
}
#define HAS_STORE_FOUR 1
#endif

/* The batch's pixels: rgb (+ skip_add, may be NULL) at pixel[q * per_pixel] of the output. */
static void write_pixels(void *out, float rgb[BATCH][HIDDEN], float skip_add[BATCH][3], const int64_t pixel[BATCH],
                         int per_pixel, int pixels, int64_t plane, int64_t pitch, int units) {
    for (int q = 0; q < pixels;) {
#ifdef HAS_STORE_FOUR
        if (plane == 1 && pitch == 3 && q + 4 <= pixels) { /* an interleaved canvas */
            const int64_t at = pixel[q * per_pixel];
            if (pixel[(q + 1) * per_pixel] == at + 3 && pixel[(q + 2) * per_pixel] == at + 6
                && pixel[(q + 3) * per_pixel] == at + 9) {
                store_four(out, at, rgb + q, skip_add ? skip_add + q : NULL, units);
                q += 4;
                continue;
            }
        }
#endif
        for (int c = 0; c < 3; c++) {
            float v = rgb[q][c];
            if (skip_add)
                v += skip_add[q][c];
            store(out, c * plane + pixel[q * per_pixel], v, units);
        }
        q++;
    }
}

/* Render rows y0, y0 + step, ... below y1 of a window `width` pixels wide (threads take
 * interleaved rows, so each gets its share of the busy pixels when a mask is sparse).
 * lat_y/rel_y: (rows, taps) latent row and relative y of each ensemble neighbour (taps 1 or 2),
 * lat_x/rel_x likewise per column; they index the latent table (lat_h x lat_w x row).
 * mask (rows x width, may be NULL): pixels to render; others are left untouched.
 * skip (3 x skip_h x skip_w, may be NULL): an image added bilinearly at taps sy_lo/sy_hi/sy_frac
 * per row and sx_* per column (LM-LTE's and our LM-LIIF's input skip).
 * out: channel c of pixel (y, x) at out[c * plane + y * stride + x * pitch], in `units` (store()):
 * the canvas is an image's samples, pixel-interleaved (plane 1, pitch 3), in the units it is saved in.
 * The output layer is linear, so it runs once per pixel on the area-weighted sum of the
 * neighbours' last hidden layers instead of once per neighbour.
 * Returns the number of pixels drawn (with a mask, the caller need not count it again).
 */
int64_t lmf_render(const float *table, int64_t row, int64_t lat_w, int64_t depth, int kind,
                   const float *base, const float *extra, int64_t code,
                   const float *weights, const float *biases, int64_t layers, const float *w_out, const float *b_out,
                   const int64_t *lat_y, const double *rel_y, const int64_t *lat_x, const double *rel_x,
                   int64_t taps, int64_t y0, int64_t y1, int64_t step, int64_t width, const uint8_t *mask,
                   const float *skip, int64_t skip_h, int64_t skip_w, const int64_t *sy_lo, const int64_t *sy_hi,
                   const float *sy_frac, const int64_t *sx_lo, const int64_t *sx_hi, const float *sx_frac,
                   void *out, int64_t stride, int64_t plane, int64_t pitch, int units) {
    const Model m = {table, row, depth, kind == AFFINE ? 1 : 0, layers, code, base, extra, weights, biases};
    float h[BATCH][HIDDEN];
    int64_t lat[BATCH];
    float weight[BATCH];
    int64_t pixel[BATCH];
    float skip_add[BATCH][3]; /* each pixel's bilinear skip, per channel */
    const int per_pixel = (int)(taps * taps);
    /* The skip's two input rows of the output row being drawn, mixed once per row over the columns
     * the window's taps read (the same products and sums as mixing them pixel by pixel, which cost a
     * ninth of the render): a pixel mixes two of these along x. */
    int64_t cx0 = 0, cx1 = 1, mixed_for = -1;
    if (skip) {
        cx0 = sx_lo[0], cx1 = sx_hi[0] + 1;
        for (int64_t x = 1; x < width; x++) {
            cx0 = sx_lo[x] < cx0 ? sx_lo[x] : cx0;
            cx1 = sx_hi[x] + 1 > cx1 ? sx_hi[x] + 1 : cx1;
        }
    }
    const int64_t span = cx1 - cx0;
    float mixed[3 * span];
    int n = 0;
    int64_t drawn = 0;
    /* the 3-wide output layer padded to HIDDEN columns, so it runs as vector FMAs */
    float w_pad[HIDDEN * HIDDEN] = {0}, b_pad[HIDDEN] = {0};
    for (int i = 0; i < HIDDEN; i++)
        for (int c = 0; c < 3; c++) w_pad[i * HIDDEN + c] = w_out[i * 3 + c];
    for (int c = 0; c < 3; c++) b_pad[c] = b_out[c];
    for (int64_t y = y0; y < y1; y += step) {
        for (int64_t x = 0; x <= width; x++) {
            /* a batch runs when full, and at the end of the thread's last row: it carries over row
             * ends, so narrow windows (CMSR's coarse rectangles, masked rows) fill their batches too */
            if (n > 0 && (n + per_pixel > BATCH || (x == width && y + step >= y1))) {
                for (int s = n; s < BATCH; s++) {
                    lat[s] = lat[0];
                    memset(h[s], 0, sizeof h[s]);
                }
                modulated_layers(h, lat, &m);
                /* ensemble-weighted last hidden layer per pixel, then the output layer */
                float mix[BATCH][HIDDEN], rgb[BATCH][HIDDEN];
                const int pixels = n / per_pixel;
                for (int q = 0; q < pixels; q++) ensemble(mix[q], weight + q * per_pixel, h + q * per_pixel, per_pixel);
                linear(rgb, mix, w_pad, b_pad, pixels);
                write_pixels(out, rgb, skip ? skip_add : NULL, pixel, per_pixel, pixels, plane, pitch, units);
                n = 0;
            }
            if (x == width) break;
            if (mask && !mask[y * width + x]) { /* skip the run of unwanted pixels, 8 mask bytes a step */
                const uint8_t *wanted = mask + y * width;
                int64_t next = x + 1;
                for (uint64_t eight; next + 8 <= width && (memcpy(&eight, wanted + next, 8), eight == 0);)
                    next += 8;
                while (next < width && !wanted[next]) next++;
                x = next - 1;
                continue;
            }
            drawn++;
            if (skip) {
                if (mixed_for != y) {
                    const float fy = sy_frac[y];
                    for (int c = 0; c < 3; c++) {
                        const float *img = skip + c * skip_h * skip_w;
                        const float *lo = img + sy_lo[y] * skip_w, *hi = img + sy_hi[y] * skip_w;
                        for (int64_t j = cx0; j < cx1; j++) mixed[c * span + j - cx0] = lo[j] * (1 - fy) + hi[j] * fy;
                    }
                    mixed_for = y;
                }
                const float fx = sx_frac[x];
                const int64_t left = sx_lo[x] - cx0, right = sx_hi[x] - cx0;
                for (int c = 0; c < 3; c++)
                    skip_add[n / per_pixel][c] = mixed[c * span + left] * (1 - fx) + mixed[c * span + right] * fx;
            }
            const double *ry = rel_y + y * taps, *rx = rel_x + x * taps;
            double area[2][2], total = 0.0;
            for (int a = 0; a < taps; a++)
                for (int b = 0; b < taps; b++) {
                    area[a][b] = fabs(ry[a] * rx[b]) + 1e-9;
                    total += area[a][b];
                }
            const double inv_total = 1.0 / total;
            for (int a = 0; a < taps; a++)
                for (int b = 0; b < taps; b++) {
                    lat[n] = lat_y[y * taps + a] * lat_w + lat_x[x * taps + b];
                    input_stage(h[n], &m, kind, lat[n], (float)ry[a], (float)rx[b]);
                    /* LIIF's ensemble: each neighbour takes the diagonally opposite area */
                    weight[n] = taps == 2 ? (float)(area[1 - a][1 - b] * inv_total) : 1.0f;
                    pixel[n] = y * stride + x * pitch;
                    n++;
                }
        }
    }
    return drawn;
}

/* The blend's bilinear step a * wa + b * wb, written as the one multiply-add GCC contracts it to where the
 * CPU has FMA, so the vector forms below and the plain loops give the same bits whatever the compiler. */
#if defined(__FMA__)
#define MIX(a, wa, b, wb) fmaf(a, wa, (b) * (wb))
#else
#define MIX(a, wa, b, wb) ((a) * (wa) + (b) * (wb))
#endif

/* Columns x0..x1 of coarse row r (planar, 3 x coarse_h x coarse_w) sampled at the output columns'
 * taps, pixel-interleaved: row[(x - x0) * 3 + c]. */
static void columns_of(float *row, const float *coarse, int64_t coarse_h, int64_t coarse_w, int64_t r,
                       const int64_t *lo_x, const int64_t *hi_x, const float *fx, int64_t x0, int64_t x1) {
    const float *src[3] = {coarse + r * coarse_w, coarse + (coarse_h + r) * coarse_w,
                           coarse + (2 * coarse_h + r) * coarse_w};
    int64_t x = x0;
#if defined(__AVX512F__)
    /* 16 columns a step where their taps lie within 16 coarse columns (any coarse factor above 16/15):
     * those are loaded once a channel and picked by permutes, and the three channels interleaved by
     * permutes, instead of six scalar loads and three stores a column. */
    const __m512i pick_ab[3] = {_mm512_setr_epi32(0, 16, 0, 1, 17, 0, 2, 18, 0, 3, 19, 0, 4, 20, 0, 5),
                                _mm512_setr_epi32(21, 0, 6, 22, 0, 7, 23, 0, 8, 24, 0, 9, 25, 0, 10, 26),
                                _mm512_setr_epi32(0, 11, 27, 0, 12, 28, 0, 13, 29, 0, 14, 30, 0, 15, 31, 0)};
    const __m512i pick_c[3] = {_mm512_setr_epi32(0, 1, 16, 3, 4, 17, 6, 7, 18, 9, 10, 19, 12, 13, 20, 15),
                               _mm512_setr_epi32(0, 21, 2, 3, 22, 5, 6, 23, 8, 9, 24, 11, 12, 25, 14, 15),
                               _mm512_setr_epi32(26, 1, 2, 27, 4, 5, 28, 7, 8, 29, 10, 11, 30, 13, 14, 31)};
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; x + 16 <= x1; x += 16) {
        const int64_t base = lo_x[x];
        if (hi_x[x + 15] - base > 15)
            break;
        const __m512i b = _mm512_set1_epi64(base);
        const __m512i lo = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512(lo_x + x), b))),
            _mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512(lo_x + x + 8), b)), 1);
        const __m512i hi = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512(hi_x + x), b))),
            _mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512(hi_x + x + 8), b)), 1);
        const __m512 wx = _mm512_loadu_ps(fx + x), vx = _mm512_sub_ps(one, wx);
        const int64_t left = coarse_w - base;
        const __mmask16 inside = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 ch[3];
        for (int c = 0; c < 3; c++) {
            const __m512 taps = _mm512_maskz_loadu_ps(inside, src[c] + base);
            ch[c] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, taps), vx,
                                    _mm512_mul_ps(_mm512_permutexvar_ps(hi, taps), wx));
        }
        float *at = row + (x - x0) * 3;
        for (int k = 0; k < 3; k++)
            _mm512_storeu_ps(at + 16 * k, _mm512_permutex2var_ps(_mm512_permutex2var_ps(ch[0], pick_ab[k], ch[1]),
                                                                 pick_c[k], ch[2]));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    /* the same with AVX2, 8 columns a step (taps within 8 coarse columns: factors above 8/7); the three
     * channels interleaved by one permute each per output vector and two blends */
    const __m256i pick[3][3] = {{_mm256_setr_epi32(0, 0, 0, 1, 0, 0, 2, 0), _mm256_setr_epi32(0, 0, 0, 0, 1, 0, 0, 2),
                                 _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 0, 0)},
                                {_mm256_setr_epi32(0, 3, 0, 0, 4, 0, 0, 5), _mm256_setr_epi32(0, 0, 3, 0, 0, 4, 0, 0),
                                 _mm256_setr_epi32(2, 0, 0, 3, 0, 0, 4, 0)},
                                {_mm256_setr_epi32(0, 0, 6, 0, 0, 7, 0, 0), _mm256_setr_epi32(5, 0, 0, 6, 0, 0, 7, 0),
                                 _mm256_setr_epi32(0, 5, 0, 0, 6, 0, 0, 7)}};
    /* the lanes of each output vector taken from channel 1 and from channel 2 (blend masks) */
    const __m256 lanes_147 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, 0, -1, 0, 0, -1));
    const __m256 lanes_25 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, 0, 0, -1, 0, 0));
    const __m256 lanes_036 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, 0, -1, 0, 0, -1, 0));
    const __m256 from_1[3] = {lanes_147, lanes_25, lanes_036}, from_2[3] = {lanes_25, lanes_036, lanes_147};
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; x + 8 <= x1; x += 8) {
        const int64_t base = lo_x[x];
        if (hi_x[x + 7] - base > 7)
            break;
        int32_t lo32[8], hi32[8];
        for (int j = 0; j < 8; j++) lo32[j] = (int32_t)(lo_x[x + j] - base), hi32[j] = (int32_t)(hi_x[x + j] - base);
        const __m256i lo = _mm256_loadu_si256((const __m256i *)lo32), hi = _mm256_loadu_si256((const __m256i *)hi32);
        const __m256 wx = _mm256_loadu_ps(fx + x), vx = _mm256_sub_ps(one, wx);
        const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(coarse_w - base)), lane);
        __m256 ch[3];
        for (int c = 0; c < 3; c++) {
            const __m256 taps = _mm256_maskload_ps(src[c] + base, inside);
            ch[c] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(taps, lo), vx,
                                    _mm256_mul_ps(_mm256_permutevar8x32_ps(taps, hi), wx));
        }
        float *at = row + (x - x0) * 3;
        for (int k = 0; k < 3; k++) {
            __m256 v = _mm256_permutevar8x32_ps(ch[0], pick[k][0]);
            v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(ch[1], pick[k][1]), from_1[k]);
            v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(ch[2], pick[k][2]), from_2[k]);
            _mm256_storeu_ps(at + 8 * k, v);
        }
    }
#endif
    for (; x < x1; x++) { /* a column's taps read once for its three samples */
        const int64_t lo = lo_x[x], hi = hi_x[x];
        const float wx = fx[x], vx = 1 - wx;
        float *at = row + (x - x0) * 3;
        for (int c = 0; c < 3; c++) at[c] = MIX(src[c][lo], vx, src[c][hi], wx);
    }
}

/* The samples of one output row, lo * (1 - wy) + hi * wy for n interleaved values, stored at
 * out[at + k] (contiguous: the canvas's layout) with the units branch outside the loop, so the
 * loop vectorises. */
static void mix_contiguous(void *out, int64_t at, const float *lo, const float *hi, float wy, int64_t n, int units) {
    const float vy = 1 - wy;
#if defined(__AVX512F__)
    if (units == CODES8) { /* 8-bit samples, 16 a step: store()'s operations and bits (the conversion rounds
                            * half to even, as nearbyintf), where GCC turned its clamp into compares and
                            * masked multiplies: 1.3-2x faster on an Intel Xeon with AVX-512 */
        const __m512 a = _mm512_set1_ps(vy), b = _mm512_set1_ps(wy), one = _mm512_set1_ps(1.0f);
        const __m512 two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps(), half_peak = _mm512_set1_ps(127.5f);
        int64_t k = 0;
#if defined(__AVX512BW__)
        /* 64 a step, the low clamp left to the packs' unsigned saturation: a value below 0 (NaN and -inf
         * too, which convert to INT_MIN; `min(2, x)` keeps NaN) packs to 0 as clamping first would give,
         * and three packs and a 4 x 4 permute replace four narrowing conversions (2 uops each) */
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (; k + 64 <= n; k += 64) {
            __m512i s[4];
            for (int j = 0; j < 4; j++) {
                const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(lo + k + 16 * j), a,
                                                 _mm512_mul_ps(_mm512_loadu_ps(hi + k + 16 * j), b));
                s[j] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_min_ps(two, _mm512_add_ps(v, one)), half_peak));
            }
            const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(s[0], s[1]), _mm512_packus_epi32(s[2], s[3]));
            _mm512_storeu_si512((uint8_t *)out + at + k, _mm512_permutexvar_epi32(order, bytes));
        }
#endif
        for (; k + 16 <= n; k += 16) {
            const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(lo + k), a, _mm512_mul_ps(_mm512_loadu_ps(hi + k), b));
            const __m512 u2 = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, one), zero), two); /* NaN -> 0 */
            const __m512i s = _mm512_cvtps_epi32(_mm512_mul_ps(u2, half_peak));
            _mm_storeu_si128((__m128i *)((uint8_t *)out + at + k), _mm512_cvtepi32_epi8(s));
        }
        for (; k < n; k++) store(out, at + k, MIX(lo[k], vy, hi[k], wy), CODES8);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (units == CODES8) { /* the same with AVX2, 32 samples a step: four vectors packed into 32 bytes */
        const __m256 a = _mm256_set1_ps(vy), b = _mm256_set1_ps(wy), one = _mm256_set1_ps(1.0f);
        const __m256 two = _mm256_set1_ps(2.0f), half_peak = _mm256_set1_ps(127.5f);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undo the packs' lane interleave */
        int64_t k = 0;
        for (; k + 32 <= n; k += 32) {
            __m256i s[4];
            for (int j = 0; j < 4; j++) {
                const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(lo + k + 8 * j), a,
                                                 _mm256_mul_ps(_mm256_loadu_ps(hi + k + 8 * j), b));
                /* the low clamp left to the packs, as with AVX-512 above */
                s[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_min_ps(two, _mm256_add_ps(v, one)), half_peak));
            }
            const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(s[0], s[1]), _mm256_packus_epi32(s[2], s[3]));
            _mm256_storeu_si256((__m256i *)((uint8_t *)out + at + k), _mm256_permutevar8x32_epi32(bytes, order));
        }
        for (; k < n; k++) store(out, at + k, MIX(lo[k], vy, hi[k], wy), CODES8);
        return;
    }
#endif
    switch (units) {
    case NORMALISED:
        for (int64_t k = 0; k < n; k++) store(out, at + k, MIX(lo[k], vy, hi[k], wy), NORMALISED);
        break;
    case UNIT:
        for (int64_t k = 0; k < n; k++) store(out, at + k, MIX(lo[k], vy, hi[k], wy), UNIT);
        break;
    case CODES8:
        for (int64_t k = 0; k < n; k++) store(out, at + k, MIX(lo[k], vy, hi[k], wy), CODES8);
        break;
    default:
        for (int64_t k = 0; k < n; k++) store(out, at + k, MIX(lo[k], vy, hi[k], wy), CODES16);
    }
}

/* CMSR's coarse levels: write the bilinear sample of `coarse` (3 x coarse_h x coarse_w) into n
 * rectangles of out (rects: n x (y0, y1, x0, x1), in the block's rows and columns, whose
 * coarse-grid taps are lo_y, hi_y, fy per row and lo_x, hi_x, fx per column; taps increase
 * with the index). The rectangles are the runs of LR blocks at one level: no mask is read, so
 * a level costs its own pixels. Separable, columns first: each coarse row a rectangle taps is
 * sampled at its output columns once (into `rows`, scratch of 2 x 3 x its width floats, the two
 * coarse rows an output row mixes), so the pass over every output pixel is a contiguous
 * multiply-add per sample, in the canvas's interleaved layout (plane 1, pitch 3); other layouts
 * go pixel by pixel. The coarse values are normalised; out is written as lmf_render writes it. */
void lmf_blend_rects(const int64_t *rects, int64_t n, const float *coarse, int64_t coarse_h, int64_t coarse_w,
                     const int64_t *lo_y, const int64_t *hi_y, const float *fy, const int64_t *lo_x,
                     const int64_t *hi_x, const float *fx, void *out, int64_t stride, int64_t plane, int64_t pitch,
                     float *rows, int units) {
    const int interleaved = plane == 1 && pitch == 3;
    for (int64_t k = 0; k < n; k++) {
        const int64_t y0 = rects[4 * k], y1 = rects[4 * k + 1], x0 = rects[4 * k + 2], x1 = rects[4 * k + 3];
        const int64_t width = 3 * (x1 - x0);
        float *slot[2] = {rows, rows + width};
        int64_t held[2] = {-1, -1}; /* the coarse row in each slot */
        for (int64_t y = y0; y < y1; y++) {
            const int64_t lo = lo_y[y], hi = hi_y[y];
            int s0 = held[0] == lo ? 0 : held[1] == lo ? 1 : -1;
            if (s0 < 0) { /* into the slot that does not hold the other tap's row */
                s0 = held[0] == hi ? 1 : 0;
                columns_of(slot[s0], coarse, coarse_h, coarse_w, lo, lo_x, hi_x, fx, x0, x1);
                held[s0] = lo;
            }
            const int s1 = held[s0] == hi ? s0 : 1 - s0;
            if (held[s1] != hi) {
                columns_of(slot[s1], coarse, coarse_h, coarse_w, hi, lo_x, hi_x, fx, x0, x1);
                held[s1] = hi;
            }
            const float *mixed[2] = {slot[s0], slot[s1]};
            if (interleaved) {
                mix_contiguous(out, y * stride + x0 * 3, mixed[0], mixed[1], fy[y], width, units);
                continue;
            }
            const float wy = fy[y], vy = 1 - wy;
            for (int64_t x = x0; x < x1; x++)
                for (int c = 0; c < 3; c++) {
                    const int64_t i = (x - x0) * 3 + c;
                    store(out, c * plane + y * stride + x * pitch, MIX(mixed[0][i], vy, mixed[1][i], wy), units);
                }
        }
    }
}
