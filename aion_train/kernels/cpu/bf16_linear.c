/* y = x W^T (+ bias) for bf16 x [M, K] and a bf16 weight W [N, K] packed once into
 * [ceil(N/16)][K/2][16][2]: block b holds outputs 16b..16b+15, for each pair of inputs
 * (2k, 2k+1). One 64-byte load then feeds 16 outputs of every row through AVX512-BF16's
 * VDPBF16PS (pairs of bf16 products summed into fp32), x's pair broadcast to the 16 lanes.
 * Sums are fp32 over k in order, bias (fp32) added, rounded once to bf16 (round to nearest
 * even). Threads: OpenMP over groups of 4 blocks (64 outputs); loaded into a process that
 * has torch, the OpenMP runtime is torch's own (same soname), so this shares its pool.
 * Built and loaded by aion_train/kernels/bf16_linear.py. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define J 4     /* 16-output blocks per tile */
#define MR 4    /* rows per tile */

void aion_bf16_pack(const uint16_t *w, uint16_t *p, int64_t n, int64_t k) {
    const int64_t nblk = (n + 15) / 16, k2n = k / 2;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblk; b++)
        for (int64_t k2 = 0; k2 < k2n; k2++)
            for (int64_t j = 0; j < 16; j++) {
                uint16_t *dst = p + ((b * k2n + k2) * 16 + j) * 2;
                const int64_t row = b * 16 + j;
                if (row < n) {
                    dst[0] = w[row * k + 2 * k2];
                    dst[1] = w[row * k + 2 * k2 + 1];
                } else {
                    dst[0] = dst[1] = 0;
                }
            }
}

static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t ldx, const uint16_t *p,
                                                         const float *bias, uint16_t *y, int64_t ldy, int64_t n,
                                                         int64_t k, int64_t b0, int nb, int rows) {
    __m512 acc[MR][J];
    const int64_t k2n = k / 2;
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nb; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < k2n; k2++) {
        __m512i wv[J];
        for (int j = 0; j < nb; j++) wv[j] = _mm512_loadu_si512((const void *)(p + ((b0 + j) * k2n + k2) * 32));
        for (int m = 0; m < rows; m++) {
            uint32_t pair;
            memcpy(&pair, x + m * ldx + 2 * k2, 4);
            const __m512i xb = _mm512_set1_epi32((int)pair);
            for (int j = 0; j < nb; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], (__m512bh)xb);
        }
    }
    for (int j = 0; j < nb; j++) {
        const int64_t col = (b0 + j) * 16;
        const int64_t left = n - col;
        const __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + col) : _mm512_setzero_ps();
        for (int m = 0; m < rows; m++) {
            const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], bv));
            _mm256_mask_storeu_epi16((void *)(y + m * ldy + col), keep, (__m256i)out);
        }
    }
}

void aion_bf16_linear(const uint16_t *x, int64_t ldx, const uint16_t *p, const float *bias, uint16_t *y,
                      int64_t ldy, int64_t m, int64_t n, int64_t k) {
    const int64_t nblk = (n + 15) / 16, groups = (nblk + J - 1) / J;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int nb = (int)((g + 1) * J <= nblk ? J : nblk - g * J);
        for (int64_t m0 = 0; m0 < m; m0 += MR) {
            const int rows = (int)(m - m0 < MR ? m - m0 : MR);
            const uint16_t *xm = x + m0 * ldx;
            uint16_t *ym = y + m0 * ldy;
            if (nb == J) { /* constant tile sizes: the accumulators stay in registers */
                switch (rows) {
                case 1: tile(xm, ldx, p, bias, ym, ldy, n, k, g * J, J, 1); break;
                case 2: tile(xm, ldx, p, bias, ym, ldy, n, k, g * J, J, 2); break;
                case 3: tile(xm, ldx, p, bias, ym, ldy, n, k, g * J, J, 3); break;
                default: tile(xm, ldx, p, bias, ym, ldy, n, k, g * J, J, MR); break;
                }
            } else {
                tile(xm, ldx, p, bias, ym, ldy, n, k, g * J, nb, rows);
            }
        }
    }
}
