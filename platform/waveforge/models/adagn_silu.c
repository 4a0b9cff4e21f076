/* waveforge's fused CPU kernel for sampling: GroupNorm, per-sample modulation and SiLU in two passes.

   Built and loaded by waveforge/models/cpu_kernels.py (plain C, OpenMP; no PyTorch headers, so it
   compiles in well under a second). Eager PyTorch runs the same chain as 5 passes over memory (bias add,
   GroupNorm statistics and normalisation, modulation, SiLU); here pass 1 accumulates per-channel sums
   and sums of squares (float over blocks of 64 pixels, then double), the group statistics of x + bias
   follow from them exactly, and pass 2 writes silu(A x + B) with one scale A and shift B per channel. */
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
