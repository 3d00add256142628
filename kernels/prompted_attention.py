"""Triton kernels of ``prompted_attention`` (SPEC §3): one online-softmax pass over a
sequence's token keys/values and then its prompt keys/values, forward and backward.

Addressing (shared by all kernels)
----------------------------------
* Every tensor is read/written through its own strides: 4 batch strides, a sequence
  stride, and a unit stride along the head dim.  The flat batch index ``b`` (row-major
  over the batch dims, sizes ``S0 x S1 x S2 x S3``) is split with div/mod in
  :func:`_boff`; size-1/broadcast dims simply have stride 0 (prompts).
* A program owns ``G`` sequences (``b = pid0 * G + g``) and ``SLOT`` positions of each:
  tile row ``r`` is sequence ``r // SLOT``, position ``blk * SLOT + r % SLOT``.  Long
  sequences use ``G = 1``; short ones (temporal stage: ~10 queries, 12 keys) pack many
  sequences into one 64-row tile, and a block-diagonal mask (``same`` below) keeps each
  query on the keys of its own sequence.
* Segments (block-diagonal attention, each block with its own prompts) are grid axis 2;
  up to two segments, whose lengths/prompt pointers/strides arrive as scalar arguments
  suffixed ``a`` / ``b`` and are picked with :func:`_pick`.
* ``LSE`` and ``DELTA`` are dense fp32 ``(batch, LQ)`` buffers indexed ``b * LQ + pos``.
* Scores are kept in log2 units: ``qk_scale = scale * log2(e)``.
"""
import triton
import triton.language as tl


@triton.jit
def _pick(seg, a, b):
    # per-segment scalar argument: a for segment 0, b for segment 1
    return tl.where(seg == 0, a, b)


@triton.jit
def _boff(b, S1, S2, S3, s0, s1, s2, s3):
    # b = ((i0*S1 + i1)*S2 + i2)*S3 + i3   ->   offset = sum_d i_d * s_d
    # (div/mod in int32 -- the flat batch index is < 2^31 -- products in int64)
    i3 = b % S3
    b = b // S3
    i2 = b % S2
    b = b // S2
    i1 = b % S1
    i0 = b // S1
    return (i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2
            + i3.to(tl.int64) * s3)


@triton.jit
def _rows(pid_b, blk, BT, n, G: tl.constexpr, SLOT: tl.constexpr):
    # tile row r -> (sequence b, position pos, valid); also the packing group r // SLOT
    r = tl.arange(0, G * SLOT)
    b = pid_b * G + r // SLOT
    pos = blk * SLOT + r % SLOT
    return b, pos, (b < BT) & (pos < n), r // SLOT


@triton.jit
def _load(PTR, boff, pos, sl, ok, D: tl.constexpr):
    d = tl.arange(0, D)
    ptr = PTR + boff[:, None] + pos.to(tl.int64)[:, None] * sl + d[None, :]
    return tl.load(ptr, mask=ok[:, None], other=0.0)


@triton.jit
def _store(PTR, boff, pos, sl, ok, x, D: tl.constexpr):
    d = tl.arange(0, D)
    ptr = PTR + boff[:, None] + pos.to(tl.int64)[:, None] * sl + d[None, :]
    tl.store(ptr, x.to(PTR.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, PREC: tl.constexpr):
    # s = q k^T (log2 units); m' = max(m, rowmax s); p = 2^(s - m'); a = 2^(m - m')
    # l' = a l + sum p ;  acc' = a acc + p v        (rows with no valid key yet keep m=-inf)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def prompted_attn_fwd(
    Q, K, V, O, LSE,
    sq0, sq1, sq2, sq3, sql, sk0, sk1, sk2, sk3, skl,
    sv0, sv1, sv2, sv3, svl, so0, so1, so2, so3, sol,
    PKa, PVa, spka0, spka1, spka2, spka3, spkal, spva0, spva1, spva2, spva3, spval, Pa,
    PKb, PVb, spkb0, spkb1, spkb2, spkb3, spkbl, spvb0, spvb1, spvb2, spvb3, spvbl, Pb,
    NQa, NKa, NQb, NKb, S1, S2, S3, BT, LQ, qk_scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr, SLOT_P: tl.constexpr,
    D: tl.constexpr, PREC: tl.constexpr,
):
    # o_i = sum_j softmax_j(scale q_i.k_j) v_j over j in [token keys of the segment; its
    # prompts];  lse_i = log sum_j exp(scale q_i.k_j)   (natural log)
    pid_b, blk, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nq, nk = _pick(seg, NQa, NQb), _pick(seg, NKa, NKb)
    q0, k0 = _pick(seg, 0, NQa), _pick(seg, 0, NKa)
    if blk * SLOT_M >= nq:
        return
    qb, qi, q_ok, qg = _rows(pid_b, blk, BT, nq, G, SLOT_M)
    q = _load(Q, _boff(qb, S1, S2, S3, sq0, sq1, sq2, sq3), q0 + qi, sql, q_ok, D)
    m_i = tl.full([G * SLOT_M], float("-inf"), tl.float32)
    l_i = tl.zeros([G * SLOT_M], tl.float32)
    acc = tl.zeros([G * SLOT_M, D], tl.float32)

    # 1) token keys/values of this segment
    cb, cj, _, cg = _rows(pid_b, 0, BT, 0, G, SLOT_N)
    same = qg[:, None] == cg[None, :]
    kbo = _boff(cb, S1, S2, S3, sk0, sk1, sk2, sk3)
    vbo = _boff(cb, S1, S2, S3, sv0, sv1, sv2, sv3)
    for n0 in range(0, nk, SLOT_N):
        ok = (cb < BT) & (n0 + cj < nk)
        k = _load(K, kbo, k0 + n0 + cj, skl, ok, D)
        v = _load(V, vbo, k0 + n0 + cj, svl, ok, D)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, same & ok[None, :], qk_scale, PREC)

    # 2) the segment's prompt keys/values (broadcast strides, often 0 over the batch)
    P = _pick(seg, Pa, Pb)
    PK, PV = _pick(seg, PKa, PKb), _pick(seg, PVa, PVb)
    pb, pj, _, pg = _rows(pid_b, 0, BT, 0, G, SLOT_P)
    same = qg[:, None] == pg[None, :]
    pko = _boff(pb, S1, S2, S3, _pick(seg, spka0, spkb0), _pick(seg, spka1, spkb1),
                _pick(seg, spka2, spkb2), _pick(seg, spka3, spkb3))
    pvo = _boff(pb, S1, S2, S3, _pick(seg, spva0, spvb0), _pick(seg, spva1, spvb1),
                _pick(seg, spva2, spvb2), _pick(seg, spva3, spvb3))
    spkl, spvl = _pick(seg, spkal, spkbl), _pick(seg, spval, spvbl)
    for p0 in range(0, P, SLOT_P):
        ok = (pb < BT) & (p0 + pj < P)
        k = _load(PK, pko, p0 + pj, spkl, ok, D)
        v = _load(PV, pvo, p0 + pj, spvl, ok, D)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, same & ok[None, :], qk_scale, PREC)

    # 3) o = acc / l ;  lse = (m + log2 l) * ln 2
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store(O, _boff(qb, S1, S2, S3, so0, so1, so2, so3), q0 + qi, sol, q_ok,
           acc / l_safe[:, None], D)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + qb.to(tl.int64) * LQ + q0 + qi, lse, mask=q_ok)


@triton.jit
def _probs(q, do, k, v, lse2, delta, valid, qk_scale, PREC: tl.constexpr):
    # p_ij = 2^(s_ij - lse_i log2 e) ;  ds_ij = p_ij (do_i.v_j - delta_i)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def prompted_attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA,
    sq0, sq1, sq2, sq3, sql, sk0, sk1, sk2, sk3, skl, sv0, sv1, sv2, sv3, svl,
    so0, so1, so2, so3, sol, sdo0, sdo1, sdo2, sdo3, sdol, sdq0, sdq1, sdq2, sdq3, sdql,
    PKa, PVa, spka0, spka1, spka2, spka3, spkal, spva0, spva1, spva2, spva3, spval, Pa,
    GRa, sga0, sga1, sga2, sga3, sgam, sgal, gkva,
    PKb, PVb, spkb0, spkb1, spkb2, spkb3, spkbl, spvb0, spvb1, spvb2, spvb3, spvbl, Pb,
    GRb, sgb0, sgb1, sgb2, sgb3, sgbm, sgbl, gkvb,
    NQa, NKa, NQb, NKb, S1, S2, S3, BT, LQ, qk_scale, scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr, SLOT_P: tl.constexpr,
    D: tl.constexpr, PREC: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    # delta_i = do_i.o_i (stored for the dk/dv kernel);  dq_i = scale sum_j ds_ij k_j over
    # token keys and prompts;  per prompt j of this program's queries:
    #   dpk_j += scale sum_i ds_ij q_i ,  dpv_j += sum_i p_ij do_i
    # accumulated into GR (fp32) at the prompt's broadcast address (atomics), or, when
    # DETERMINISTIC, stored as this program's partial at [b, blk, j] (reduced on the host).
    pid_b, blk, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nq, nk = _pick(seg, NQa, NQb), _pick(seg, NKa, NKb)
    q0, k0 = _pick(seg, 0, NQa), _pick(seg, 0, NKa)
    if blk * SLOT_M >= nq:
        return
    qb, qi, q_ok, qg = _rows(pid_b, blk, BT, nq, G, SLOT_M)
    q = _load(Q, _boff(qb, S1, S2, S3, sq0, sq1, sq2, sq3), q0 + qi, sql, q_ok, D)
    do = _load(DO, _boff(qb, S1, S2, S3, sdo0, sdo1, sdo2, sdo3), q0 + qi, sdol, q_ok, D)
    o = _load(O, _boff(qb, S1, S2, S3, so0, so1, so2, so3), q0 + qi, sol, q_ok, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = qb.to(tl.int64) * LQ + q0 + qi
    tl.store(DELTA + row, delta, mask=q_ok)
    lse2 = tl.load(LSE + row, mask=q_ok, other=0.0) * 1.4426950408889634
    dq = tl.zeros([G * SLOT_M, D], tl.float32)

    cb, cj, _, cg = _rows(pid_b, 0, BT, 0, G, SLOT_N)
    same = (qg[:, None] == cg[None, :]) & q_ok[:, None]
    kbo = _boff(cb, S1, S2, S3, sk0, sk1, sk2, sk3)
    vbo = _boff(cb, S1, S2, S3, sv0, sv1, sv2, sv3)
    for n0 in range(0, nk, SLOT_N):
        ok = (cb < BT) & (n0 + cj < nk)
        k = _load(K, kbo, k0 + n0 + cj, skl, ok, D)
        v = _load(V, vbo, k0 + n0 + cj, svl, ok, D)
        p, ds = _probs(q, do, k, v, lse2, delta, same & ok[None, :], qk_scale, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    P = _pick(seg, Pa, Pb)
    PK, PV, GR = _pick(seg, PKa, PKb), _pick(seg, PVa, PVb), _pick(seg, GRa, GRb)
    pb, pj, _, pg = _rows(pid_b, 0, BT, 0, G, SLOT_P)
    same = (qg[:, None] == pg[None, :]) & q_ok[:, None]
    pko = _boff(pb, S1, S2, S3, _pick(seg, spka0, spkb0), _pick(seg, spka1, spkb1),
                _pick(seg, spka2, spkb2), _pick(seg, spka3, spkb3))
    pvo = _boff(pb, S1, S2, S3, _pick(seg, spva0, spvb0), _pick(seg, spva1, spvb1),
                _pick(seg, spva2, spvb2), _pick(seg, spva3, spvb3))
    gro = _boff(pb, S1, S2, S3, _pick(seg, sga0, sgb0), _pick(seg, sga1, sgb1),
                _pick(seg, sga2, sgb2), _pick(seg, sga3, sgb3)) + blk * _pick(seg, sgam, sgbm)
    spkl, spvl, sgl = _pick(seg, spkal, spkbl), _pick(seg, spval, spvbl), _pick(seg, sgal, sgbl)
    gkv = _pick(seg, gkva, gkvb)
    d = tl.arange(0, D)
    for p0 in range(0, P, SLOT_P):
        ok = (pb < BT) & (p0 + pj < P)
        k = _load(PK, pko, p0 + pj, spkl, ok, D)
        v = _load(PV, pvo, p0 + pj, spvl, ok, D)
        p, ds = _probs(q, do, k, v, lse2, delta, same & ok[None, :], qk_scale, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        gk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC) * scale
        gv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        gptr = GR + gro[:, None] + (p0 + pj).to(tl.int64)[:, None] * sgl + d[None, :]
        if DETERMINISTIC:
            tl.store(gptr, gk, mask=ok[:, None])
            tl.store(gptr + gkv, gv, mask=ok[:, None])
        else:
            tl.atomic_add(gptr, gk, mask=ok[:, None])
            tl.atomic_add(gptr + gkv, gv, mask=ok[:, None])

    _store(DQ, _boff(qb, S1, S2, S3, sdq0, sdq1, sdq2, sdq3), q0 + qi, sdql, q_ok, dq * scale, D)


@triton.jit
def prompted_attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    sq0, sq1, sq2, sq3, sql, sk0, sk1, sk2, sk3, skl, sv0, sv1, sv2, sv3, svl,
    sdo0, sdo1, sdo2, sdo3, sdol, sdk0, sdk1, sdk2, sdk3, sdkl, sdv0, sdv1, sdv2, sdv3, sdvl,
    NQa, NKa, NQb, NKb, S1, S2, S3, BT, LQ, qk_scale, scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    # for this program's token keys j, over the segment's queries i (transposed tiles):
    #   dv_j = sum_i p_ij do_i ;  dk_j = scale sum_i ds_ij q_i ,  ds_ij = p_ij (do_i.v_j - delta_i)
    pid_b, blk, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nq, nk = _pick(seg, NQa, NQb), _pick(seg, NKa, NKb)
    q0, k0 = _pick(seg, 0, NQa), _pick(seg, 0, NKa)
    if blk * SLOT_N >= nk:
        return
    kb, kj, k_ok, kg = _rows(pid_b, blk, BT, nk, G, SLOT_N)
    k = _load(K, _boff(kb, S1, S2, S3, sk0, sk1, sk2, sk3), k0 + kj, skl, k_ok, D)
    v = _load(V, _boff(kb, S1, S2, S3, sv0, sv1, sv2, sv3), k0 + kj, svl, k_ok, D)
    dk = tl.zeros([G * SLOT_N, D], tl.float32)
    dv = tl.zeros([G * SLOT_N, D], tl.float32)

    rb, ri, _, rg = _rows(pid_b, 0, BT, 0, G, SLOT_M)
    same = kg[:, None] == rg[None, :]
    qbo = _boff(rb, S1, S2, S3, sq0, sq1, sq2, sq3)
    dbo = _boff(rb, S1, S2, S3, sdo0, sdo1, sdo2, sdo3)
    for m0 in range(0, nq, SLOT_M):
        ok = (rb < BT) & (m0 + ri < nq)
        q = _load(Q, qbo, q0 + m0 + ri, sql, ok, D)
        do = _load(DO, dbo, q0 + m0 + ri, sdol, ok, D)
        row = rb.to(tl.int64) * LQ + q0 + m0 + ri
        lse2 = tl.load(LSE + row, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=ok, other=0.0)
        # transposed scores: sT[j, i] = q_i.k_j
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        pT = tl.where(same & ok[None, :], tl.exp2(sT - lse2[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)

    _store(DK, _boff(kb, S1, S2, S3, sdk0, sdk1, sdk2, sdk3), k0 + kj, sdkl, k_ok, dk * scale, D)
    _store(DV, _boff(kb, S1, S2, S3, sdv0, sdv1, sdv2, sdv3), k0 + kj, sdvl, k_ok, dv, D)
