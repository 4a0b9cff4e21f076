/* waveforge's fused CPU kernels for sampling, on float32 activations in channels_last memory (N, H, W, C).

   Built and loaded by waveforge/cpu_kernels.py (plain C, OpenMP; no PyTorch headers, so it compiles in
   well under a second).

   waveforge_adagn_silu: GroupNorm, per-sample modulation and SiLU in two passes. Eager PyTorch runs the
   chain as 5 passes over memory (bias add, GroupNorm statistics and normalisation, modulation, SiLU);
   here pass 1 accumulates per-channel sums and sums of squares (float over blocks of 64 pixels, then
   double), the group statistics of x + bias follow from them exactly, and pass 2 writes silu(A x + B)
   with one scale A and shift B per channel.

   waveforge_haar_dwt / waveforge_haar_idwt: one level of the orthonormal Haar transform (the convention
   of waveforge/wavelet.py) in one pass each, where eager PyTorch's butterfly takes seven. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for the SiLU, branch-free so that the loops vectorise: Cody-Waite range reduction to
   |r| <= ln2/2 and a degree-6 polynomial (max relative error ~2e-7 on [-87, 88]). */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    int32_t ti, mi;
    memcpy(&ti, &t, 4);
    memcpy(&mi, &magic, 4);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = (ti - mi + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

typedef struct {
    const float *x, *gamma, *beta, *bias;
    float *out;
    long N, C, HW, G;
    double eps;
    long u0, u1; /* this task's (sample, group) units [u0, u1) of N*G */
    int status;
} task_t;

/* One sample's channels [c0, c1) (whole groups): statistics, then out = silu(A x + B). */
static int chunk(const task_t *t, long n, long c0, long c1) {
    const long C = t->C, HW = t->HW, cw = c1 - c0, cg = C / t->G;
    double *s = calloc(2 * cw, sizeof(double));
    float *fs = calloc(2 * cw, sizeof(float));
    float *A = malloc(2 * cw * sizeof(float));
    if (!s || !fs || !A) { free(s); free(fs); free(A); return 1; }
    double *q = s + cw;
    float *fq = fs + cw, *B = A + cw;
    const float *xn = t->x + n * HW * C + c0;
    /* Pass 1: per-channel sums and sums of squares, in float over blocks of 64 pixels, then in double. */
    for (long p0 = 0; p0 < HW; p0 += 64) {
        long p1 = p0 + 64 < HW ? p0 + 64 : HW;
        for (long p = p0; p < p1; p++) {
            const float *r = xn + p * C;
            for (long c = 0; c < cw; c++) { fs[c] += r[c]; fq[c] += r[c] * r[c]; }
        }
        for (long c = 0; c < cw; c++) { s[c] += fs[c]; q[c] += fq[c]; fs[c] = 0.0f; fq[c] = 0.0f; }
    }
    /* Group statistics of (x + bias), then the per-channel affine map of x that gives the output. */
    const float *gm = t->gamma + n * C + c0, *bt = t->beta + n * C + c0;
    const float *bs = t->bias ? t->bias + n * C + c0 : NULL;
    for (long g0 = 0; g0 < cw; g0 += cg) {
        double sum = 0.0, sq = 0.0;
        for (long c = g0; c < g0 + cg; c++) {
            double b = bs ? bs[c] : 0.0;
            sum += s[c] + HW * b;
            sq += q[c] + 2.0 * b * s[c] + HW * b * b;
        }
        double cnt = (double)HW * cg, mean = sum / cnt, var = sq / cnt - mean * mean;
        double rstd = 1.0 / sqrt((var > 0.0 ? var : 0.0) + t->eps);
        for (long c = g0; c < g0 + cg; c++) {
            double a = rstd * gm[c];
            A[c] = (float)a;
            B[c] = (float)(bt[c] + ((bs ? bs[c] : 0.0) - mean) * a);
        }
    }
    /* Pass 2: out = silu(A x + B). */
    float *on = t->out + n * HW * C + c0;
    for (long p = 0; p < HW; p++) {
        const float *r = xn + p * C;
        float *o = on + p * C;
        for (long c = 0; c < cw; c++) {
            float v = r[c] * A[c] + B[c];
            o[c] = v / (1.0f + exp_f32(-v));
        }
    }
    free(s); free(fs); free(A);
    return 0;
}

static void run_task(task_t *t) {
    for (long u = t->u0; u < t->u1;) {
        long n = u / t->G, g = u % t->G;
        long g1 = (n + 1) * t->G < t->u1 ? t->G : t->u1 - n * t->G; /* to the end of the sample or the task */
        long cg = t->C / t->G;
        t->status |= chunk(t, n, g * cg, g1 * cg);
        u = n * t->G + g1;
    }
}

/* out = silu(group_norm(x + bias) * gamma + beta) for channels_last float32 x (N, H*W, C) with G groups of
   C/G channels; gamma, beta, bias (N, C) (bias may be NULL). The N*G (sample, group) units are split into
   `threads` contiguous ranges run by an OpenMP team: the caller's runtime, which PyTorch has already loaded
   (libgomp.so.1), so the kernel runs on the same warm threads as PyTorch's own ops instead of competing
   with them. Returns 0, or nonzero when scratch memory could not be had. */
int waveforge_adagn_silu(const float *x, float *out, const float *gamma, const float *beta, const float *bias,
                         long N, long C, long HW, long G, double eps, int threads) {
    long units = N * G;
    if (threads < 1) threads = 1;
    if (threads > units) threads = (int)units;
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : status)
    for (int i = 0; i < threads; i++) {
        task_t t = {x, gamma, beta, bias, out, N, C, HW, G, eps, units * i / threads, units * (i + 1) / threads, 0};
        run_task(&t);
        status |= t.status;
    }
    return status;
}

/* One Haar DWT level: x (N, H, W, C) channels_last contiguous -> out (N, H/2, W/2, 4C) channels_last
   contiguous, bands [LL, LH, HL, HH] of C channels each; for the 2x2 block [[a, b], [c, d]]:
   LL = (a+b+c+d)/2, LH = (a+b-c-d)/2, HL = (a-b+c-d)/2, HH = (a-b-c+d)/2. */
void waveforge_haar_dwt(const float *x, float *out, long N, long C, long H, long W, int threads) {
    const long h = H / 2, w = W / 2;
#pragma omp parallel for num_threads(threads) collapse(2) schedule(static)
    for (long n = 0; n < N; n++) {
        for (long i = 0; i < h; i++) {
            for (long j = 0; j < w; j++) {
                const float *a = x + ((n * H + 2 * i) * W + 2 * j) * C, *b = a + C;
                const float *c = a + W * C, *d = c + C;
                float *o = out + ((n * h + i) * w + j) * 4 * C;
                for (long k = 0; k < C; k++) {
                    float s0 = a[k] + c[k], s1 = b[k] + d[k], d0 = a[k] - c[k], d1 = b[k] - d[k];
                    o[k] = 0.5f * (s0 + s1);
                    o[C + k] = 0.5f * (d0 + d1);
                    o[2 * C + k] = 0.5f * (s0 - s1);
                    o[3 * C + k] = 0.5f * (d0 - d1);
                }
            }
        }
    }
}

/* The inverse: LL (N, h, w, C) and the high bands [LH, HL, HH] (N, h, w, 3C), each given by its pixel
   strides (elements between samples, rows and columns; the channel stride is 1, so a channel slice of a
   channels_last tensor is read where it lies) -> out (N, 2h, 2w, C) channels_last contiguous. */
void waveforge_haar_idwt(const float *ll, long ln, long ly, long lx, const float *hi, long hn, long hy, long hx,
                         float *out, long N, long C, long h, long w, int threads) {
    const long W = 2 * w;
#pragma omp parallel for num_threads(threads) collapse(2) schedule(static)
    for (long n = 0; n < N; n++) {
        for (long i = 0; i < h; i++) {
            for (long j = 0; j < w; j++) {
                const float *L = ll + n * ln + i * ly + j * lx, *Hb = hi + n * hn + i * hy + j * hx;
                float *a = out + ((n * 2 * h + 2 * i) * W + 2 * j) * C, *b = a + C;
                float *c = a + W * C, *d = c + C;
                for (long k = 0; k < C; k++) {
                    float p = L[k] + Hb[k], q = Hb[C + k] + Hb[2 * C + k];
                    float r = L[k] - Hb[k], s = Hb[C + k] - Hb[2 * C + k];
                    a[k] = 0.5f * (p + q);
                    b[k] = 0.5f * (p - q);
                    c[k] = 0.5f * (r + s);
                    d[k] = 0.5f * (r - s);
                }
            }
        }
    }
}
