/* Per-value Palimpsa on a CPU, forward and backward, for float (suffix _f32) and double (_f64).
 *
 * One (batch, head) pair at a time; inside it token by token, value row i by row, key column j innermost.
 * With alpha_t = exp(g_t) (one per head, or one per key column):
 *
 *   M_t[i,j] = alpha_t[j] M_{t-1}[i,j] + bv_t[i] k_t[j]
 *   J_t[i,j] = alpha_t[j] J_{t-1}[i,j] + bb_t[i] k_t[j]^2          (bb_t[i] = bb_t[0] when P == 1)
 *   o_t[i]   = scale   * sum_j M_t[i,j] q_t[j]   / (Ip + J_t[i,j])
 *   var_t[i] = scale^2 * sum_j q_t[j]^2          / (Ip + J_t[i,j])
 *
 * Layouts (contiguous, bh = b * H + h): q, k [BH,T,K]; bv [BH,T,V]; bb [BH,T,P]; g [BH,T,KG]; M0, J0, MT, JT
 * [BH,V,K]; Ip [H]; o, var [BH,T,V]; ckpt [BH,NC,2,V,K], the state before token n*C (NC = ceil(T/C)).
 *
 * The backward recomputes each chunk's states from its checkpoint into work [(C+1),2,V,K] and runs the
 * adjoint recurrence Mh_t = dM_t + alpha_{t+1} Mh_{t+1} (same for J) backwards, with the local gradients
 *   dM_t[i,j] = scale do_t[i] W,   W = q_t[j] / I,   mu = M_t[i,j] / I,
 *   dJ_t[i,j] = -W (scale do_t[i] mu + scale^2 dvar_t[i] W),
 *   dq_t[j] = sum_i scale do_t[i] mu + 2 scale^2 dvar_t[i] W,
 * and dbv_t[i] = sum_j Mh k, dbb_t[i] = sum_j Jh k^2, dk_t[j] = sum_i Mh bv + 2 k Jh bb,
 * dg_t[j] = alpha_t[j] sum_i (Mh_t M_{t-1} + Jh_t J_{t-1}), dIp = sum dJ, dM0 = alpha_0 Mh_0.
 *
 * Built without -ffast-math: every operation is IEEE (FMA contraction aside), so NaN and inf propagate.
 */
#ifndef REAL
#include <math.h>
#include <stdint.h>
#include <string.h>

#define REAL float
#define FN(name) name##_f32
#define EXP expf
#include __FILE__
#undef REAL
#undef FN
#undef EXP

#define REAL double
#define FN(name) name##_f64
#define EXP exp
#include __FILE__
#undef REAL
#undef FN
#undef EXP

int pv_abi_version(void) { return 1; }

#else

/* alpha_t for key columns, and the token's k, k^2 (and q^2). */
static inline void FN(pv_token)(int K, int KG, const REAL *gt, const REAL *kt, REAL *al, REAL *k2) {
    if (KG == 1) {
        REAL a = EXP(gt[0]);
        for (int j = 0; j < K; j++) al[j] = a;
    } else {
        for (int j = 0; j < K; j++) al[j] = EXP(gt[j]);
    }
    for (int j = 0; j < K; j++) k2[j] = kt[j] * kt[j];
}

/* One token of the state update on all rows: S = [M; J] (each [V,K]) in place. */
static inline void FN(pv_step)(int K, int V, int P, const REAL *restrict al, const REAL *restrict kt,
                               const REAL *restrict k2, const REAL *restrict bvt, const REAL *restrict bbt,
                               const REAL *restrict Min, const REAL *restrict Jin, REAL *restrict Mout,
                               REAL *restrict Jout) {
    for (int i = 0; i < V; i++) {
        const REAL bvi = bvt[i], bbi = bbt[P == 1 ? 0 : i];
        const REAL *restrict mi = Min + (int64_t)i * K, *restrict ji = Jin + (int64_t)i * K;
        REAL *restrict mo = Mout + (int64_t)i * K, *restrict jo = Jout + (int64_t)i * K;
#pragma omp simd
        for (int j = 0; j < K; j++) {
            mo[j] = al[j] * mi[j] + bvi * kt[j];
            jo[j] = al[j] * ji[j] + bbi * k2[j];
        }
    }
}

void FN(pv_forward)(int64_t BH, int64_t H, int64_t T, int64_t K, int64_t V, int64_t P, int64_t KG, int64_t C,
                    const REAL *q, const REAL *k, const REAL *bv, const REAL *bb, const REAL *g, const REAL *M0,
                    const REAL *J0, const REAL *Ip, REAL scale, REAL *o, REAL *var, REAL *MT, REAL *JT,
                    REAL *ckpt, REAL *work) {
    /* work: 3K numbers */
    REAL *al = work, *k2 = work + K, *q2 = work + 2 * K;
    const int64_t NC = (T + C - 1) / C, VK = V * K;
    for (int64_t bh = 0; bh < BH; bh++) {
        const REAL ip = Ip[bh % H];
        REAL *restrict M = MT + bh * VK, *restrict J = JT + bh * VK;
        memcpy(M, M0 + bh * VK, sizeof(REAL) * VK);
        memcpy(J, J0 + bh * VK, sizeof(REAL) * VK);
        for (int64_t t = 0; t < T; t++) {
            if (ckpt && t % C == 0) {
                REAL *c = ckpt + (bh * NC + t / C) * 2 * VK;
                memcpy(c, M, sizeof(REAL) * VK);
                memcpy(c + VK, J, sizeof(REAL) * VK);
            }
            const int64_t bt = bh * T + t;
            const REAL *restrict qt = q + bt * K, *restrict kt = k + bt * K;
            const REAL *bvt = bv + bt * V, *bbt = bb + bt * P;
            FN(pv_token)(K, KG, g + bt * KG, kt, al, k2);
            REAL *ot = o + bt * V;
            if (var) {
                for (int j = 0; j < K; j++) q2[j] = qt[j] * qt[j];
            }
            for (int64_t i = 0; i < V; i++) {
                const REAL bvi = bvt[i], bbi = bbt[P == 1 ? 0 : i];
                REAL *restrict mi = M + i * K, *restrict ji = J + i * K;
                REAL acc = 0;
                if (var) {
                    REAL accv = 0;
#pragma omp simd reduction(+:acc, accv)
                    for (int64_t j = 0; j < K; j++) {
                        const REAL m = al[j] * mi[j] + bvi * kt[j];
                        const REAL jj = al[j] * ji[j] + bbi * k2[j];
                        mi[j] = m;
                        ji[j] = jj;
                        const REAL r = 1 / (ip + jj);
                        acc += m * qt[j] * r;
                        accv += q2[j] * r;
                    }
                    var[bt * V + i] = scale * scale * accv;
                } else {
#pragma omp simd reduction(+:acc)
                    for (int64_t j = 0; j < K; j++) {
                        const REAL m = al[j] * mi[j] + bvi * kt[j];
                        const REAL jj = al[j] * ji[j] + bbi * k2[j];
                        mi[j] = m;
                        ji[j] = jj;
                        acc += m * qt[j] / (ip + jj);
                    }
                }
                ot[i] = scale * acc;
            }
        }
    }
}

void FN(pv_backward)(int64_t BH, int64_t H, int64_t T, int64_t K, int64_t V, int64_t P, int64_t KG, int64_t C,
                     const REAL *q, const REAL *k, const REAL *bv, const REAL *bb, const REAL *g, const REAL *Ip,
                     REAL scale, const REAL *ckpt, const REAL *dout, const REAL *dvar, const REAL *dMT,
                     const REAL *dJT, REAL *dq, REAL *dk, REAL *dbv, REAL *dbb, REAL *dg, REAL *dM0, REAL *dJ0,
                     REAL *dIp, REAL *work) {
    /* work: (C+1)*2*V*K states, then 7K numbers */
    const int64_t NC = (T + C - 1) / C, VK = V * K;
    REAL *S = work;
    REAL *al = work + (C + 1) * 2 * VK, *k2 = al + K, *dqa = k2 + K, *dkM = dqa + K, *dkJ = dkM + K,
         *dA = dkJ + K, *k2s = dA + K;
    (void)k2s;
    const REAL s2 = scale * scale;
    for (int64_t bh = 0; bh < BH; bh++) {
        const REAL ip = Ip[bh % H];
        /* the adjoint carried to the previous token (alpha_{t+1} Mh_{t+1}); ends as dM0, dJ0 */
        REAL *restrict cM = dM0 + bh * VK, *restrict cJ = dJ0 + bh * VK;
        if (dMT) memcpy(cM, dMT + bh * VK, sizeof(REAL) * VK); else memset(cM, 0, sizeof(REAL) * VK);
        if (dJT) memcpy(cJ, dJT + bh * VK, sizeof(REAL) * VK); else memset(cJ, 0, sizeof(REAL) * VK);
        REAL dip = 0;
        for (int64_t n = NC - 1; n >= 0; n--) {
            const int64_t t0 = n * C, c = (T - t0 < C) ? T - t0 : C;
            memcpy(S, ckpt + (bh * NC + n) * 2 * VK, sizeof(REAL) * 2 * VK);
            for (int64_t s = 0; s < c; s++) {
                const int64_t bt = bh * T + t0 + s;
                FN(pv_token)(K, KG, g + bt * KG, k + bt * K, al, k2);
                REAL *prev = S + s * 2 * VK, *next = S + (s + 1) * 2 * VK;
                FN(pv_step)(K, V, P, al, k + bt * K, k2, bv + bt * V, bb + bt * P, prev, prev + VK, next,
                            next + VK);
            }
            for (int64_t s = c - 1; s >= 0; s--) {
                const int64_t bt = bh * T + t0 + s;
                const REAL *restrict qt = q + bt * K, *restrict kt = k + bt * K;
                const REAL *bvt = bv + bt * V, *bbt = bb + bt * P, *dot = dout + bt * V;
                const REAL *dvt = dvar ? dvar + bt * V : 0;
                FN(pv_token)(K, KG, g + bt * KG, kt, al, k2);
                const REAL *Mc = S + (s + 1) * 2 * VK, *Jc = Mc + VK, *Mp = S + s * 2 * VK, *Jp = Mp + VK;
                for (int64_t j = 0; j < K; j++) dqa[j] = dkM[j] = dkJ[j] = dA[j] = 0;
                REAL dbb_sum = 0;
                for (int64_t i = 0; i < V; i++) {
                    const REAL doi = scale * dot[i], dvi = dvt ? s2 * dvt[i] : 0;
                    const REAL bvi = bvt[i], bbi = bbt[P == 1 ? 0 : i];
                    const REAL *restrict m = Mc + i * K, *restrict jc = Jc + i * K, *restrict mp = Mp + i * K,
                               *restrict jp = Jp + i * K;
                    REAL *restrict cm = cM + i * K, *restrict cj = cJ + i * K;
                    REAL smk = 0, sjk = 0, sdj = 0;
#pragma omp simd reduction(+:smk, sjk, sdj)
                    for (int64_t j = 0; j < K; j++) {
                        const REAL r = 1 / (ip + jc[j]);
                        const REAL w = qt[j] * r, mu = m[j] * r;
                        const REAL dJl = -w * (doi * mu + dvi * w);
                        const REAL mh = cm[j] + doi * w, jh = cj[j] + dJl;
                        dqa[j] += doi * mu + 2 * dvi * w;
                        sdj += dJl;
                        smk += mh * kt[j];
                        sjk += jh * k2[j];
                        dkM[j] += mh * bvi;
                        dkJ[j] += jh * bbi;
                        dA[j] += mh * mp[j] + jh * jp[j];
                        cm[j] = al[j] * mh;
                        cj[j] = al[j] * jh;
                    }
                    dip += sdj;
                    dbv[bt * V + i] = smk;
                    if (P == 1) dbb_sum += sjk; else dbb[bt * V + i] = sjk;
                }
                if (P == 1) dbb[bt] = dbb_sum;
                for (int64_t j = 0; j < K; j++) {
                    dq[bt * K + j] = dqa[j];
                    dk[bt * K + j] = dkM[j] + 2 * kt[j] * dkJ[j];
                }
                if (KG == 1) {
                    REAL sa = 0;
                    for (int64_t j = 0; j < K; j++) sa += dA[j];
                    dg[bt] = al[0] * sa;
                } else {
                    for (int64_t j = 0; j < K; j++) dg[bt * K + j] = al[j] * dA[j];
                }
            }
        }
        dIp[bh] = dip;
    }
}

#endif
