/* surgeon's CPU inference kernels: BlurPool and 2x2 space-to-depth, each one pass over the input.
 *
 * PyTorch runs BlurPool as a padded copy plus a depthwise convolution (slow in NCHW memory) and
 * space-to-depth as a strided copy whose inner loop steps by 2; these kernels read every input
 * row once and write every output once. surgeon/layers/native.py compiles this file with the
 * system C compiler on first use and calls it through ctypes; every function takes float32
 * tensors in the layout its name says, and the caller checks shapes, layouts and dtypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------- blur */

/* BlurPool in 2d: a separable filter with `f` taps per dim, strides (sh, sw). Padding is given
 * as index tables, so reflect, replicate, zero and ceil-mode extras are all one code path:
 * rows[i * f + k] is the input row tap k of output row i reads (-1: a zero row; the vertical
 * stride lives in this table), and cols[p]
 * the input column of padded column p, for the p < left and p >= left + W the input does not
 * cover. Columns are first filtered vertically into a padded row buffer, then horizontally. */

/* out[j] = sum_k taps[k] * row[stride * j + k], the horizontal pass: all taps in one loop, so
 * each output is written once (the usual filters, 3 and 4 taps at stride 2, spelled out so
 * that the compiler vectorises them with shuffles) */
static void blur_columns(const float *restrict row, float *restrict out, int64_t count,
                         int64_t f, int64_t stride, const float *taps) {
    const float t0 = taps[0], t1 = f > 1 ? taps[1] : 0.0f, t2 = f > 2 ? taps[2] : 0.0f;
    const float t3 = f > 3 ? taps[3] : 0.0f;
    if (stride == 2 && f == 4) {
        for (int64_t j = 0; j < count; ++j) {
            const float *w = row + 2 * j;
            out[j] = t0 * w[0] + t1 * w[1] + t2 * w[2] + t3 * w[3];
        }
        return;
    }
    if (stride == 2 && f == 3) {
        for (int64_t j = 0; j < count; ++j) {
            const float *w = row + 2 * j;
            out[j] = t0 * w[0] + t1 * w[1] + t2 * w[2];
        }
        return;
    }
    for (int64_t j = 0; j < count; ++j) {
        const float *w = row + stride * j;
        float sum = t0 * w[0];
        for (int64_t k = 1; k < f; ++k) sum += taps[k] * w[k];
        out[j] = sum;
    }
}

/* dst[0:n] (= or +=) a[0] * s[0][0:n] + ... + a[m-1] * s[m-1][0:n], m = 1..4, in one pass */
static void add_rows(float *restrict dst, const float *const *s, const float *a, int m,
                     int64_t n, int assign) {
    /* slots past m alias slot 0 and are never read */
    const float *restrict s0 = s[0], *restrict s1 = s[m > 1 ? 1 : 0];
    const float *restrict s2 = s[m > 2 ? 2 : 0], *restrict s3 = s[m > 3 ? 3 : 0];
    const float a0 = a[0], a1 = a[m > 1 ? 1 : 0], a2 = a[m > 2 ? 2 : 0], a3 = a[m > 3 ? 3 : 0];
    if (m == 4) {
        for (int64_t w = 0; w < n; ++w) {
            const float sum = a0 * s0[w] + a1 * s1[w] + a2 * s2[w] + a3 * s3[w];
            dst[w] = assign ? sum : dst[w] + sum;
        }
    } else if (m == 3) {
        for (int64_t w = 0; w < n; ++w) {
            const float sum = a0 * s0[w] + a1 * s1[w] + a2 * s2[w];
            dst[w] = assign ? sum : dst[w] + sum;
        }
    } else if (m == 2) {
        for (int64_t w = 0; w < n; ++w) {
            const float sum = a0 * s0[w] + a1 * s1[w];
            dst[w] = assign ? sum : dst[w] + sum;
        }
    } else {
        for (int64_t w = 0; w < n; ++w) dst[w] = assign ? a0 * s0[w] : dst[w] + a0 * s0[w];
    }
}

/* dst[0:n] = sum_k taps[k] * src[k * step + (0:n)] over k < f: taps at a fixed step, four a pass */
static void add_taps(float *dst, const float *src, int64_t step, const float *taps, int64_t f,
                     int64_t n) {
    for (int64_t k = 0; k < f; k += 4) {
        const int m = f - k < 4 ? (int)(f - k) : 4;
        const float *s[4];
        for (int t = 0; t < m; ++t) s[t] = src + (k + t) * step;
        add_rows(dst, s, taps + k, m, n, k == 0);
    }
}

/* dst[0:n] = sum_k taps[k] * rows_k[0:n] over the taps whose row is not -1, four rows a pass */
static void blur_rows(const float *base, int64_t row_size, const int64_t *rows, int64_t f,
                      const float *taps, float *dst, int64_t n) {
    int assign = 1;
    for (int64_t k = 0; k < f;) {
        const float *s[4];
        float a[4];
        int m = 0;
        for (; k < f && m < 4; ++k) {
            if (rows[k] < 0) continue;
            s[m] = base + rows[k] * row_size;
            a[m++] = taps[k];
        }
        if (m == 0) continue;
        add_rows(dst, s, a, m, n, assign);
        assign = 0;
    }
    if (assign) memset(dst, 0, sizeof(float) * (size_t)n);
}

/* the padded positions p < left and left + W <= p < Wp of a row buffer of C-vectors, copied from
 * the input positions cols[p] of its filtered part `inner` (zeros for -1) */
static void fill_padding(float *buffer, const float *inner, const int64_t *cols, int64_t Wp,
                         int64_t left, int64_t W, int64_t C) {
    for (int64_t p = 0; p < Wp; ++p) {
        if (p == left) p = left + W;
        if (p >= Wp) break;
        if (C == 1) /* NCHW: one value, no library call */
            buffer[p] = cols[p] < 0 ? 0.0f : inner[cols[p]];
        else if (cols[p] < 0)
            memset(buffer + p * C, 0, sizeof(float) * (size_t)C);
        else
            memcpy(buffer + p * C, inner + cols[p] * C, sizeof(float) * (size_t)C);
    }
}

/* one thread's padded row buffer of C-vectors: the Wp padded positions, or the whole input
 * row at offset `left` when that reaches further (NULL when out of memory) */
static float *row_buffer(int64_t Wp, int64_t left, int64_t W, int64_t C) {
    const int64_t span = Wp > left + W ? Wp : left + W;
    return (float *)malloc(sizeof(float) * (size_t)(span * C));
}

/* planes at most this wide take `blur_plane_stride2` (8 x C x 28 x 28 and 8 x C x 14 x 14:
 * 1.3x and 1.15x faster than the per-row loop; at 56 wide the per-row loop, which prefetches
 * as it goes, was faster on inputs coming from memory) */
#define FLAT_WIDTH 32

/* The run [i0, i1) of output rows whose taps are f consecutive input rows starting at
 * 2i - top, all inside the input (rows[i * f + k] == 2i - top + k): the rows a flat pass can
 * filter. Returns i1 - i0 and sets *first = i0, *top. */
static int64_t regular_rows(const int64_t *rows, int64_t f, int64_t Ho, int64_t H, int64_t *first,
                            int64_t *top) {
    int64_t i0 = 0, count = 0;
    for (int64_t i = 0; i < Ho; ++i) {
        const int64_t start = rows[i * f];
        int regular = start >= 0 && start + f <= H && (count == 0 || start - 2 * i == -*top);
        for (int64_t k = 1; regular && k < f; ++k) regular = rows[i * f + k] == start + k;
        if (regular) {
            if (count == 0) {
                i0 = i;
                *top = 2 * i - start;
            }
            ++count;
        } else if (count > 0) {
            break;
        }
    }
    *first = i0;
    return count;
}

/* One narrow plane at stride 2 in both dims, in flat passes instead of short per-row loops.
 * Taking input rows in pairs turns the vertical filter of every regular output row into one
 * sweep, v[2iW + w] = sum_k taps[k] * x[(2i - top + k) W + w], which also filters the odd rows
 * (the second half of each 2W slot, unused); those halves then hold the padded columns, so the
 * horizontal filter of all rows is one sweep too, o[iW + j] = sum_k taps[k] * v[2(iW + j) + k]
 * (v here counted from the left padding), compacted to Wo per row at the end. Needs Wp <= 2W.
 * v: left + 2W * Ho + 2W floats, o: W * Ho. */
static void blur_plane_stride2(const float *xp, float *yp, int64_t H, int64_t W, int64_t Ho,
                               int64_t Wo, int64_t f, const float *taps, const int64_t *rows,
                               const int64_t *cols, int64_t Wp, int64_t left, float *v,
                               float *o) {
    float *base = v + left; /* row i's column c lives at base[2iW + c], c in [-left, Wp - left) */
    int64_t i0 = 0, top = 0;
    const int64_t count = regular_rows(rows, f, Ho, H, &i0, &top);
    for (int64_t i = 0; i < Ho; ++i)
        if (i < i0 || i >= i0 + count) blur_rows(xp, W, rows + i * f, f, taps, base + 2 * i * W, W);
    if (count > 0) { /* row i0's first tap is input row 2 i0 - top */
        const int64_t start = 2 * i0 * W;
        add_taps(base + start, xp + (2 * i0 - top) * W, W, taps, f, 2 * (count - 1) * W + W);
    }
    for (int64_t i = 0; i < Ho; ++i) {
        float *row = base + 2 * i * W;
        fill_padding(row - left, row, cols, Wp, left, W, 1);
    }
    blur_columns(v, o, (Ho - 1) * W + Wo, f, 2, taps);
    for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) yp[i * Wo + j] = o[i * W + j];
}

/* x: planes x H x W (NCHW, N * C planes) -> y: planes x Ho x Wo. Returns 0, or 1 when out of
 * memory. */
int surgeon_blur2d_nchw(const float *x, float *y, int64_t planes, int64_t H, int64_t W,
                        int64_t Ho, int64_t Wo, int64_t f, int64_t sw,
                        const float *taps, const int64_t *rows, const int64_t *cols, int64_t Wp,
                        int64_t left, int threads) {
    int failed = 0;
    const int flat = sw == 2 && Wp <= 2 * W && W <= FLAT_WIDTH;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int64_t flat_size = left + 2 * W * Ho + 2 * W + W * Ho; /* v, then o */
        float *buffer = flat ? (float *)malloc(sizeof(float) * (size_t)flat_size)
                             : row_buffer(Wp, left, W, 1);
        if (!buffer) failed = 1;
#pragma omp for schedule(static)
        for (int64_t plane = 0; plane < planes; ++plane) {
            if (!buffer) continue;
            const float *xp = x + plane * H * W;
            float *yp = y + plane * Ho * Wo;
            if (flat) {
                /* the next plane streams into cache while this one is filtered */
                for (int64_t l = 0; plane + 1 < planes && l < (H * W * 4 + 63) / 64; ++l)
                    __builtin_prefetch((const char *)(xp + H * W) + 64 * l);
                float *o = buffer + left + 2 * W * Ho + 2 * W;
                blur_plane_stride2(xp, yp, H, W, Ho, Wo, f, taps, rows, cols, Wp, left, buffer, o);
                continue;
            }
            float *inner = buffer + left;
            /* the next plane streams into cache while this one is filtered: two of its rows
             * per output row here, 64-byte lines */
            const char *next = (const char *)(xp + H * W);
            const int64_t lines = plane + 1 < planes ? (H * W * 4 + 63) / 64 : 0;
            const int64_t per_row = Ho > 0 ? (lines + Ho - 1) / Ho : 0;
            for (int64_t i = 0; i < Ho; ++i) {
                for (int64_t l = i * per_row; l < (i + 1) * per_row && l < lines; ++l)
                    __builtin_prefetch(next + 64 * l);
                blur_rows(xp, W, rows + i * f, f, taps, inner, W);
                fill_padding(buffer, inner, cols, Wp, left, W, 1);
                blur_columns(buffer, yp + i * Wo, Wo, f, sw, taps);
            }
        }
        free(buffer);
    }
    return failed;
}

/* x: N x H x W x C (channels-last) -> y: N x Ho x Wo x C, vectorised along the channels. */
int surgeon_blur2d_nhwc(const float *x, float *y, int64_t N, int64_t H, int64_t W, int64_t C,
                        int64_t Ho, int64_t Wo, int64_t f, int64_t sw,
                        const float *taps, const int64_t *rows, const int64_t *cols, int64_t Wp,
                        int64_t left, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buffer = row_buffer(Wp, left, W, C);
        if (!buffer) failed = 1;
#pragma omp for schedule(static)
        for (int64_t line = 0; line < N * Ho; ++line) {
            if (!buffer) continue;
            const int64_t n = line / Ho, i = line % Ho;
            float *inner = buffer + left * C;
            blur_rows(x + n * H * W * C, W * C, rows + i * f, f, taps, inner, W * C);
            fill_padding(buffer, inner, cols, Wp, left, W, C);
            float *out = y + line * Wo * C;
            for (int64_t j = 0; j < Wo; ++j) {
                add_taps(out + j * C, buffer + sw * j * C, C, taps, f, C);
            }
        }
        free(buffer);
    }
    return failed;
}

/* ------------------------------------------------------------------------ space-to-depth */

/* Block 2x2 space-to-depth of x zero-padded by (top, left) and cut or zero-filled to Ho x Wo
 * blocks: phase p = 2 * ph + pw of block (i, j) is x[2i + ph - top][2j + pw - left], or 0 where
 * that lies outside x. Phase-major output puts phase p of channel c at channel p * C + c,
 * channel-major at c * 4 + p. */

/* even[j] = row[2j - left], odd[j] = row[2j + 1 - left], zero outside [0, W) */
static void split_columns(const float *row, int64_t W, int64_t left, float *even, float *odd,
                          int64_t Wo) {
    int64_t lo = (left + 1) / 2;               /* first j with 2j - left >= 0 */
    int64_t hi = W - 2 + left >= 0 ? (W - 2 + left) / 2 + 1 : 0; /* past last j, 2j+1-left < W */
    if (lo > Wo) lo = Wo;
    if (hi > Wo) hi = Wo;
    if (hi < lo) hi = lo;
    for (int64_t j = 0; j < lo; ++j) {
        const int64_t q = 2 * j - left;
        even[j] = q >= 0 && q < W ? row[q] : 0.0f;
        odd[j] = q + 1 >= 0 && q + 1 < W ? row[q + 1] : 0.0f;
    }
    const float *base = row + (2 * lo - left);
    for (int64_t j = 0; j < hi - lo; ++j) {
        even[lo + j] = base[2 * j];
        odd[lo + j] = base[2 * j + 1];
    }
    for (int64_t j = hi; j < Wo; ++j) {
        const int64_t q = 2 * j - left;
        even[j] = q >= 0 && q < W ? row[q] : 0.0f;
        odd[j] = q + 1 >= 0 && q + 1 < W ? row[q + 1] : 0.0f;
    }
}

/* x: N x C x H x W (contiguous) -> y: N x 4C x Ho x Wo (contiguous). */
void surgeon_space_to_depth2_nchw(const float *x, float *y, int64_t N, int64_t C, int64_t H,
                                  int64_t W, int64_t Ho, int64_t Wo, int64_t top, int64_t left,
                                  int phase_major, int threads) {
    const int64_t plane = Ho * Wo;
    /* no padding: each block row reads two whole input rows (measured 1.3-2.4x faster than
     * the general loop below on 28-112 wide maps; with padding that one is faster) */
    const int unpadded = top == 0 && left == 0 && H >= 2 * Ho && W >= 2 * Wo;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
            const float *xp = x + (n * C + c) * H * W;
            if (unpadded) {
                float *first = phase_major ? y + (n * 4 * C + c) * plane : y + (n * C + c) * 4 * plane;
                const int64_t step = phase_major ? C * plane : plane; /* between phases */
                for (int64_t i = 0; i < Ho; ++i) {
                    const float *restrict upper = xp + 2 * i * W, *restrict lower = upper + W;
                    float *restrict p0 = first + i * Wo, *restrict p1 = p0 + step;
                    float *restrict p2 = p1 + step, *restrict p3 = p2 + step;
                    for (int64_t j = 0; j < Wo; ++j) {
                        p0[j] = upper[2 * j];
                        p1[j] = upper[2 * j + 1];
                    }
                    for (int64_t j = 0; j < Wo; ++j) {
                        p2[j] = lower[2 * j];
                        p3[j] = lower[2 * j + 1];
                    }
                }
                continue;
            }
            for (int64_t ph = 0; ph < 2; ++ph) {
                const int64_t p = 2 * ph;
                float *even = phase_major ? y + ((n * 4 + p) * C + c) * plane
                                          : y + ((n * C + c) * 4 + p) * plane;
                float *odd = phase_major ? even + C * plane : even + plane;
                for (int64_t i = 0; i < Ho; ++i) {
                    const int64_t r = 2 * i + ph - top;
                    if (r < 0 || r >= H) {
                        memset(even + i * Wo, 0, sizeof(float) * (size_t)Wo);
                        memset(odd + i * Wo, 0, sizeof(float) * (size_t)Wo);
                    } else {
                        split_columns(xp + r * W, W, left, even + i * Wo, odd + i * Wo, Wo);
                    }
                }
            }
        }
    }
}

/* x: N x H x W x C (channels-last) -> y: N x Ho x Wo x 4C (channels-last). Returns 0, or 1 when
 * out of memory. */
int surgeon_space_to_depth2_nhwc(const float *x, float *y, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t Ho, int64_t Wo, int64_t top, int64_t left,
                                 int phase_major, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *zeros = (float *)calloc((size_t)C, sizeof(float));
        if (!zeros) failed = 1;
#pragma omp for schedule(static) collapse(2)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t i = 0; i < Ho; ++i) {
                if (!zeros) continue;
                for (int64_t j = 0; j < Wo; ++j) {
                    const float *src[4];
                    for (int p = 0; p < 4; ++p) {
                        const int64_t r = 2 * i + p / 2 - top, q = 2 * j + p % 2 - left;
                        src[p] = r >= 0 && r < H && q >= 0 && q < W
                                     ? x + ((n * H + r) * W + q) * C
                                     : zeros;
                    }
                    float *o = y + ((n * Ho + i) * Wo + j) * 4 * C;
                    if (phase_major) {
                        for (int p = 0; p < 4; p += 2) {
                            if (src[p] != zeros && src[p + 1] == src[p] + C) { /* one run */
                                memcpy(o + p * C, src[p], sizeof(float) * (size_t)(2 * C));
                            } else {
                                memcpy(o + p * C, src[p], sizeof(float) * (size_t)C);
                                memcpy(o + (p + 1) * C, src[p + 1], sizeof(float) * (size_t)C);
                            }
                        }
                    } else {
                        const float *a = src[0], *b = src[1], *d = src[2], *e = src[3];
                        for (int64_t c = 0; c < C; ++c) {
                            o[4 * c] = a[c];
                            o[4 * c + 1] = b[c];
                            o[4 * c + 2] = d[c];
                            o[4 * c + 3] = e[c];
                        }
                    }
                }
            }
        }
        free(zeros);
    }
    return failed;
}
