/* Fused CPU kernels of the block compressors (streaming_muloco/native.py loads them):
 * - sm_stat_quantize: the statistical quantizer's encode (quantizers.py);
 * - sm_block_lut_decode: per-block table-lookup decode (statistical bin means, e3m0 levels);
 * - sm_sparse_select: the sparse compressor's per-chunk top-k, codes and levels (sparse.py).
 *
 * Why by hand: in torch ops the statistical quantizer makes ~7 passes per cache chunk (mean,
 * centred copy, sum of squares, scale, clamp, int cast, pack) plus an embedding_bag per bin
 * table, about 0.4x the throughput of a memory copy on a CPU core; a top-k per chunk has no
 * cheap torch form either. Here each block is read from memory once and every pass runs on it
 * while it sits in L1 (docs/design.md §5, "Fused CPU kernels"). Semantics are the Python
 * paths': statistical codes are packed little-endian within each byte, each bin's mean is its
 * metadata (its centre when empty); only summation orders differ, so a value on a bin edge may
 * take the neighbouring bin.
 *
 * The caller splits work by blocks across threads; each call writes only its blocks' outputs.
 * Statistical block b's codes start at byte b·B/per, so B must be a multiple of 8/bits
 * (checked in Python) for two threads never to share a byte.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8
#define SUB 256 /* elements per sub-chunk of a block: codes kept in a stack array */

static float clamp_bin(float t, float top) {
    if (!(t >= 0.0f)) return 0.0f; /* also maps NaN to bin 0, where the torch cast gives 0 too */
    return t > top ? top : t;
}

void sm_stat_quantize(const float *x, int64_t n, int64_t B, int bits, float clip, int64_t b0, int64_t b1,
                      uint8_t *codes, float *meta) {
    const int nbins = 1 << bits, per = 8 / bits;
    const float half = (float)nbins / 2.0f, top = (float)nbins - 0.5f;
    const float wscale = (float)(2.0 * (double)clip / (double)nbins);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * B, m = (n - s < B) ? n - s : B;
        const float *xb = x + s;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= m; i += LANES)
            for (int l = 0; l < LANES; ++l) acc[l] += xb[i + l];
        float tot = 0.0f;
        for (int l = 0; l < LANES; ++l) tot += acc[l];
        for (; i < m; ++i) tot += xb[i];
        const float mean = tot / (float)m;
        float sq[LANES] = {0};
        for (i = 0; i + LANES <= m; i += LANES)
            for (int l = 0; l < LANES; ++l) {
                const float d = xb[i + l] - mean;
                sq[l] += d * d;
            }
        float var = 0.0f;
        for (int l = 0; l < LANES; ++l) var += sq[l];
        for (; i < m; ++i) {
            const float d = xb[i] - mean;
            var += d * d;
        }
        float w = sqrtf(var / (float)m) * wscale;
        float fl = fabsf(mean) * 0x1p-20f;
        if (fl < 1e-30f) fl = 1e-30f;
        if (w < fl) w = fl; /* a NaN width stays NaN, as torch.maximum keeps it */
        const float inv = 1.0f / w;
        /* per-bin totals in `hists` interleaved tables: independent read-modify-write chains; at
         * 256 bins one table, as zeroing and merging four would cost more than they save */
        const int hists = nbins <= 16 ? 4 : 1;
        float sums[4][256], cnts[4][256];
        for (int l = 0; l < hists; ++l) {
            memset(sums[l], 0, sizeof(float) * nbins);
            memset(cnts[l], 0, sizeof(float) * nbins);
        }
        uint8_t c[SUB];
        uint8_t *out = codes + s / per;
        for (int64_t j0 = 0; j0 < m; j0 += SUB) {
            const int len = (int)((m - j0 < SUB) ? m - j0 : SUB);
            const float *xs = xb + j0;
            for (int k = 0; k < len; ++k) {
                float t = (xs[k] - mean) * inv;
                t += half;
                c[k] = (uint8_t)(int)clamp_bin(t, top);
            }
            int k = 0;
            if (hists == 4)
                for (; k + 4 <= len; k += 4)
                    for (int l = 0; l < 4; ++l) {
                        sums[l][c[k + l]] += xs[k + l];
                        cnts[l][c[k + l]] += 1.0f;
                    }
            for (; k < len; ++k) {
                sums[0][c[k]] += xs[k];
                cnts[0][c[k]] += 1.0f;
            }
            const int nbytes = (len + per - 1) / per;
            for (int k = len; k < nbytes * per; ++k) c[k] = 0; /* padding codes of a partial last byte */
            uint8_t *o = out + j0 / per;
            if (per == 1) {
                memcpy(o, c, (size_t)len);
            } else if (per == 2) {
                for (int q = 0; q < nbytes; ++q) o[q] = (uint8_t)(c[2 * q] | (c[2 * q + 1] << 4));
            } else {
                for (int q = 0; q < nbytes; ++q)
                    o[q] = (uint8_t)(c[4 * q] | (c[4 * q + 1] << 2) | (c[4 * q + 2] << 4) | (c[4 * q + 3] << 6));
            }
        }
        float *mb = meta + b * nbins;
        for (int v = 0; v < nbins; ++v) {
            const float centre = ((float)v + 0.5f - half) * w + mean;
            float sv = sums[0][v], cv = cnts[0][v];
            for (int l = 1; l < hists; ++l) {
                sv += sums[l][v];
                cv += cnts[l][v];
            }
            mb[v] = cv > 0.0f ? sv / cv : centre;
        }
    }
}

/* Decode of any block quantizer whose value is a per-block table lookup: out[i] = tables[block of
 * i][code i] (statistical: the bin means; e3m0: the 16 levels times the block scale). Reads only
 * the codes, so any B works; each block writes only its own outputs. */
void sm_block_lut_decode(const uint8_t *codes, const float *means, int64_t n, int64_t B, int bits, int64_t b0,
                        int64_t b1, float *out) {
    const int nbins = 1 << bits, per = 8 / bits, mask = nbins - 1;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * B, e = (n - s < B) ? n : s + B;
        const float *mb = means + b * nbins;
        int64_t i = s;
        for (; i < e && i % per; ++i) out[i] = mb[(codes[i / per] >> ((i % per) * bits)) & mask];
        if (per == 4) {
            for (; i + 4 <= e; i += 4) {
                const unsigned v = codes[i / 4];
                out[i] = mb[v & 3];
                out[i + 1] = mb[(v >> 2) & 3];
                out[i + 2] = mb[(v >> 4) & 3];
                out[i + 3] = mb[v >> 6];
            }
        } else if (per == 2) {
            for (; i + 2 <= e; i += 2) {
                const unsigned v = codes[i / 2];
                out[i] = mb[v & 15];
                out[i + 1] = mb[v >> 4];
            }
        }
        for (; i < e; ++i) out[i] = mb[(codes[i / per] >> ((i % per) * bits)) & mask];
    }
}

/* |x| as its fp32 bit pattern with the sign cleared: ordered like |x| (NaN above +inf). */
static uint32_t abs_key(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7FFFFFFFu;
}

/* The k largest |x| of one chunk of L (streaming_muloco/sparse.py): chunk-local indices in
 * ascending order, their 2-bit codes (sign << 1 | magnitude bit, unpacked) and the chunk's two
 * magnitude levels [low, high]. Radix select on the bit patterns of |x|, in two passes over the
 * chunk: a histogram of the top 8 bits (four interleaved tables, so repeated buckets do not
 * serialise) names the bucket that holds the k-th largest key; a second pass keeps the indices
 * above that bucket and copies the bucket's keys to `ckey`, where 8 more bits at a time settle
 * the threshold. Ties at the threshold go to the lowest indices. Scratch: `ws` holds 3·L words. */
static void sparse_chunk(const float *x, int64_t L, int64_t k, int64_t *idx, uint8_t *code, float *lev,
                         uint32_t *ws) {
    if (k >= L) {
        for (int64_t i = 0; i < L; ++i) idx[i] = i;
    } else {
        uint32_t h4[4][256], hist[256];
        memset(h4, 0, sizeof h4);
        int64_t i = 0;
        for (; i + 4 <= L; i += 4)
            for (int l = 0; l < 4; ++l) ++h4[l][abs_key(x[i + l]) >> 23];
        for (; i < L; ++i) ++h4[0][abs_key(x[i]) >> 23];
        for (int v = 0; v < 256; ++v) hist[v] = h4[0][v] + h4[1][v] + h4[2][v] + h4[3][v];
        int need = (int)k, b = 255; /* need: keys still to take from the threshold's bucket */
        while ((int)hist[b] < need) need -= (int)hist[b--];
        uint32_t *above = ws, *ckey = ws + L, *cidx = ws + 2 * L;
        int64_t na = 0, nc = 0;
        const uint32_t bb = (uint32_t)b;
        for (i = 0; i < L; ++i) { /* branch-free: write always, advance when it belongs */
            const uint32_t u = abs_key(x[i]), e = u >> 23;
            above[na] = (uint32_t)i;
            na += e > bb;
            ckey[nc] = u;
            cidx[nc] = (uint32_t)i;
            nc += e == bb;
        }
        uint32_t prefix = bb;
        int shift = 23;
        const int shifts[3] = {15, 7, 0};
        for (int lv = 0; lv < 3 && (int64_t)need < nc; ++lv) {
            const int sh = shifts[lv], width = shift - sh; /* 8 bits, 7 at the last level */
            memset(hist, 0, sizeof hist);
            for (int64_t c = 0; c < nc; ++c)
                if ((ckey[c] >> shift) == prefix) ++hist[(ckey[c] >> sh) & ((1u << width) - 1)];
            int bl = (1 << width) - 1;
            while ((int)hist[bl] < need) need -= (int)hist[bl--];
            prefix = (prefix << width) | (uint32_t)bl;
            shift = sh;
            if ((int)hist[bl] == need) break; /* the whole bucket is taken: no tie to break */
        }
        /* merge, in index order, the keys above the bucket with the bucket's chosen ones */
        int64_t j = 0, a = 0;
        for (int64_t c = 0; c < nc; ++c) {
            const uint32_t top = ckey[c] >> shift;
            if (!(top > prefix || (top == prefix && need > 0 && need--))) continue;
            while (a < na && above[a] < cidx[c]) idx[j++] = above[a++];
            idx[j++] = cidx[c];
        }
        while (a < na) idx[j++] = above[a++];
    }
    float lo = INFINITY, hi = 0.0f;
    for (int64_t q = 0; q < k; ++q) {
        const float v = x[idx[q]], m = fabsf(v);
        lo = m < lo ? m : lo;
        hi = m > hi ? m : hi;
        code[q] = (uint8_t)((v < 0.0f) << 1);
    }
    const float mid = (lo + hi) * 0.5f;
    float s_hi = 0.0f, s_lo = 0.0f, n_hi = 0.0f;
    for (int64_t q = 0; q < k; ++q) {
        const float m = fabsf(x[idx[q]]);
        if (m >= mid) { /* the max always reaches the midpoint, so n_hi >= 1 */
            code[q] |= 1;
            s_hi += m;
            n_hi += 1.0f;
        } else {
            s_lo += m;
        }
    }
    const float n_lo = (float)k - n_hi;
    lev[0] = n_lo > 0.0f ? s_lo / n_lo : lo; /* no value in the low half: lo == hi */
    lev[1] = s_hi / n_hi;
}

/* Chunks [b0, b1) of x (n elements, chunks of B keeping kf; a partial tail chunk keeps kt). */
void sm_sparse_select(const float *x, int64_t n, int64_t B, int64_t kf, int64_t kt, int64_t b0, int64_t b1,
                      int64_t *idx, uint8_t *code, float *levels) {
    const int64_t nf = n / B;
    uint32_t *ws = malloc(sizeof(uint32_t) * 3 * (size_t)(B < n ? B : n)); /* one chunk's scratch */
    if (!ws) abort();
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t L = b < nf ? B : n - nf * B, k = b < nf ? kf : kt, slot = b * kf;
        sparse_chunk(x + b * B, L, k, idx + slot, code + slot, levels + 2 * b, ws);
    }
    free(ws);
}
