"""Triton kernels of ``prompted_attention``: one online-softmax pass over a sequence's
token keys/values and then its prompt keys/values, forward and backward
(``docs/design.md``, "The op contract").

Operand descriptors (shared by all kernels)
-------------------------------------------
* A tensor operand is a base pointer plus a stride tuple ``(s0, s1, s2, s3, sl)``: four
  batch strides and the sequence stride (the head dim has stride 1).  The launcher
  merges the batch dims (``avstfp_fast/ops/layout.py``) to at most four, of sizes
  ``BS = (S1, S2, S3, BT)`` (``S0 = BT / (S1 S2 S3)``, ``BT`` the batch product);
  :func:`_boff` splits a flat batch index with div/mod.  Broadcast dims (prompts) have
  stride 0.  Integer arguments equal to 1 become constants at launch, so unused dims
  cost nothing.
* Segments (block-diagonal attention, each block with its own prompts): grid axis 1 of
  the key-block-parallel ("fa2") backward kernels; the forward lays the segments' query
  blocks end to end on axis 0 (:func:`_seg_block`, no program for a shorter segment's
  missing blocks) and the sequence-owning backward uses axis 0 = group * NSEG + segment.
  Per-segment values arrive as small tuples, one entry per segment (``NSEG`` <= 4):
  lengths ``Q_LEN``/``K_LEN``, prompt pointers ``PK``/``PV``, their stride tuples, prompt
  counts ``N_PROMPT``; :func:`_sel` picks entry ``seg`` (a where-chain: tuples cannot be
  indexed by a run-time value, and the interpreter cannot follow address tables in
  memory).  The words are the CUDA backend's (csrc/attn_params.h: q_len, k_len,
  n_prompt; delta, dq, dkv for the backward's parts), so one name means one thing in
  both backends and in ops/layout.py.
* Grid axis 0 is ``group * NB + block``: the ``NB`` query (or key) blocks of a sequence
  group are adjacent, so they run together and share the group's K/V in L2.
* Prompts as the last keys: the forward and the sequence-owning backward walk a segment's
  token keys and then its prompts as one source (:func:`_load_kp` picks each row's
  pointer), so the prompts share the last key tile where they fit (49 + 10, 54 + 2 and
  5 + 10 keys are one 64-row tile; 10 + 2 one 16-slot tile).  The fa2 backward kernels
  keep separate prompt steps / blocks.
* A program owns ``G`` sequences (``b = group * G + g``) and ``SLOT`` positions of each:
  tile row ``r`` is sequence ``r // SLOT``, position ``block * SLOT + r % SLOT``.  Long
  sequences use ``G = 1``; short ones (temporal stage: ~10 queries, 12 keys) pack several
  sequences into one 64-row tile, and every product is per sequence (:func:`_bdot`: a
  batched 3-D dot over ``[G, SLOT, D]``), so score tiles are ``[G SLOT_M, SLOT_N]`` --
  column ``c`` is slot ``c`` of the row's own sequence -- and only the diagonal blocks of
  the G x G sequence grid are computed.
* ``LSE`` and ``DELTA`` are dense fp32 ``(BT, LQ)`` buffers indexed ``b * LQ + pos``.
* Scores are kept in log2 units: ``qk_scale = scale * log2(e)``.
* ``WHILE`` (set when interpreting): loops over run-time lengths are written as
  ``while`` loops, which every Triton interpreter accepts (3.6's turns a run-time
  ``range`` bound into a Python int from a 1-element array, which NumPy 2 refuses);
  compiled kernels use ``range`` loops, which Triton software-pipelines.  Both forms
  call the same step functions.
"""
import triton
import triton.language as tl

#: Whether these kernels run in Triton's CPU interpreter: ``triton.jit`` reads
#: TRITON_INTERPRET (this knob) as it wraps each kernel, i.e. once, when this module is
#: imported; ``ops.triton_backend`` reads the flag.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _sel(t, i, N: tl.constexpr):
    # t[i] for a run-time i < N
    r = t[0]
    for s in tl.static_range(1, N):
        r = tl.where(i == s, t[s], r)
    return r


@triton.jit
def _sel_st(t, i, N: tl.constexpr):
    # t[i] of a tuple of stride tuples (s0, s1, s2, s3, sl)
    r0, r1, r2, r3, rl = t[0][0], t[0][1], t[0][2], t[0][3], t[0][4]
    for s in tl.static_range(1, N):
        r0 = tl.where(i == s, t[s][0], r0)
        r1 = tl.where(i == s, t[s][1], r1)
        r2 = tl.where(i == s, t[s][2], r2)
        r3 = tl.where(i == s, t[s][3], r3)
        rl = tl.where(i == s, t[s][4], rl)
    return (r0, r1, r2, r3, rl)


@triton.jit
def _start(t, i, N: tl.constexpr):
    # sum of t[s] for s < i: where segment i starts
    r = 0
    for s in tl.static_range(0, N - 1):
        r += tl.where(i > s, t[s], 0)
    return r


@triton.jit
def _unravel4(b, S1, S2, S3):
    # b = ((i0*S1 + i1)*S2 + i2)*S3 + i3   ->   (i0, i1, i2, i3)   (div/mod in int32)
    i3 = b % S3
    b = b // S3
    i2 = b % S2
    b = b // S2
    return b // S1, b % S1, i2, i3


@triton.jit
def _boff(b, BS, st):
    # batch index b over the dims (S1, S2, S3) = BS[:3]  ->  offset = sum_d i_d * st[d]
    # (div/mod in int32 -- the batch product is < 2^31 -- products in int64)
    i0, i1, i2, i3 = _unravel4(b, BS[0], BS[1], BS[2])
    return (i0.to(tl.int64) * st[0] + i1.to(tl.int64) * st[1] + i2.to(tl.int64) * st[2]
            + i3.to(tl.int64) * st[3])


@triton.jit
def _rows(grp, blk, BT, n, G: tl.constexpr, SLOT: tl.constexpr):
    # tile row r -> (sequence b, position pos, valid)
    r = tl.arange(0, G * SLOT)
    if G == 1:
        # one sequence: a uniform (splat) index, so that its batch offsets are computed
        # once per program, not once per row held (they stay live across whole loops)
        b = tl.full([SLOT], 0, tl.int32) + grp
    else:
        b = grp * G + r // SLOT
    pos = blk * SLOT + r % SLOT
    return b, pos, (b < BT) & (pos < n)


@triton.jit
def _kv_rows(grp, BT, BS, sk, sv, spk_s, spv_s, G: tl.constexpr, SLOT: tl.constexpr):
    # the key rows of sequence group grp (sequence cb, position cj in a key tile) and their
    # batch offsets into K, V and the segment's prompt keys/values
    cb, cj, _ = _rows(grp, 0, BT, 0, G, SLOT)
    return (cb, cj, _boff(cb, BS, sk), _boff(cb, BS, sv), _boff(cb, BS, spk_s),
            _boff(cb, BS, spv_s))


@triton.jit
def _ptr(PTR, boff, pos, st, D: tl.constexpr):
    d = tl.arange(0, D)
    return PTR + boff[:, None] + pos.to(tl.int64)[:, None] * st[4] + d[None, :]


@triton.jit
def _load(PTR, boff, pos, st, ok, D: tl.constexpr):
    return tl.load(_ptr(PTR, boff, pos, st, D), mask=ok[:, None], other=0.0)


@triton.jit
def _store(PTR, boff, pos, st, ok, x, D: tl.constexpr):
    tl.store(_ptr(PTR, boff, pos, st, D), x.to(PTR.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _bdot(a, b, G: tl.constexpr, TA: tl.constexpr, TB: tl.constexpr, PREC: tl.constexpr):
    # Per-sequence products of packed tiles: a stacks G blocks [M, K] ([K, M] if TA),
    # b G blocks [K, N] ([N, K] if TB); returns the G products [M, N] stacked, [G M, N].
    # G == 1: one 2-D dot (wgmma on sm_90).  G > 1: one batched 3-D dot, so only the
    # diagonal (same-sequence) blocks are computed, not the G x G block grid.
    if G == 1:
        if TA:
            a = tl.trans(a)
        if TB:
            b = tl.trans(b)
        c = tl.dot(a, b, input_precision=PREC)
    else:
        a3 = tl.reshape(a, [G, a.shape[0] // G, a.shape[1]])
        b3 = tl.reshape(b, [G, b.shape[0] // G, b.shape[1]])
        if TA:
            a3 = tl.permute(a3, (0, 2, 1))
        if TB:
            b3 = tl.permute(b3, (0, 2, 1))
        c3 = tl.dot(a3, b3, input_precision=PREC)
        c = tl.reshape(c3, [G * c3.shape[1], c3.shape[2]])
    return c


@triton.jit
def _bcol(x, G: tl.constexpr, N: tl.constexpr):
    # x: one value per packed row (G sequences x M slots) -> the [G N, M] tile whose row
    # g N + j holds x[g M : g M + M] (per-query values along the columns of a transposed,
    # per-sequence score tile)
    if G == 1:
        r = x[None, :]
    else:
        M: tl.constexpr = x.shape[0] // G
        r = tl.reshape(tl.broadcast_to(tl.reshape(x, [G, 1, M]), [G, N, M]), [G * N, M])
    return r


@triton.jit
def _cols_ok(ok, j0, n, G: tl.constexpr, SLOT: tl.constexpr):
    # validity of the score columns (slots j0 + c < n of the row's own sequence); with
    # G == 1 the columns are the loaded rows, whose mask ``ok`` already says so
    if G == 1:
        r = ok
    else:
        r = j0 + tl.arange(0, SLOT) < n
    return r


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, kbo, vbo, sk, sv, PKs, PVs, pko, pvo, spk_s, spv_s,
              j0, k0, nk, nkp, cb, cj, BT, qk_scale, G: tl.constexpr, SLOT: tl.constexpr,
              D: tl.constexpr, PREC: tl.constexpr):
    # keys j0 + cj (< nk + P) of the combined source -- the segment's token keys, then its
    # prompts, which share the last key tile where they fit; score column c of a row is
    # key j0 + c of the row's own sequence (per-sequence products, _bdot):
    # s = q k^T (log2 units); m' = max(m, rowmax s); p = 2^(s - m'); a = 2^(m - m')
    # l' = a l + sum p ;  acc' = a acc + p v        (rows with no valid key yet keep m=-inf)
    j = j0 + cj
    ok = (cb < BT) & (j < nkp)
    k = _load_kp(K, kbo, sk, k0, PKs, pko, spk_s, j, nk, ok, D)
    v = _load_kp(V, vbo, sv, k0, PVs, pvo, spv_s, j, nk, ok, D)
    s = _bdot(q, k, G, False, True, PREC) * qk_scale
    s = tl.where(_cols_ok(ok, j0, nkp, G, SLOT)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _bdot(p.to(v.dtype), v, G, False, False, PREC)
    return acc, m_new, l_i


@triton.jit
def _seg_block(pid, NBS, NSEG: tl.constexpr):
    # grid axis 0 = group * sum(NBS) + (block index within the group's segments): the
    # segments' blocks are laid end to end, so no program is spent on a shorter segment
    # (ViT-B/16 spatial: 1 + 4 query blocks per group instead of 2 x 4)
    tot = NBS[0]
    for s in tl.static_range(1, NSEG):
        tot += NBS[s]
    grp, r = pid // tot, pid % tot
    seg = 0
    start = 0
    for s in tl.static_range(0, NSEG - 1):
        start += NBS[s]
        seg = tl.where(r >= start, s + 1, seg)
    return grp, seg, r - _start(NBS, seg, NSEG)


@triton.jit
def prompted_attn_fwd(
    Q, K, V, O, LSE, sq, sk, sv, so,
    PK, PV, spk, spv, N_PROMPT, Q_LEN, K_LEN, NBS, BS, LQ, qk_scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr,
    D: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr, WHILE: tl.constexpr,
):
    # o_i = sum_j softmax_j(scale q_i.k_j) v_j over j in [token keys of the segment; its
    # prompts];  lse_i = log sum_j exp(scale q_i.k_j)   (natural log)
    # Grid axis 0 only: (group, segment, query block), see _seg_block.
    grp, seg, blk = _seg_block(tl.program_id(0), NBS, NSEG)
    nq, nk = _sel(Q_LEN, seg, NSEG), _sel(K_LEN, seg, NSEG)
    q0, k0 = _start(Q_LEN, seg, NSEG), _start(K_LEN, seg, NSEG)
    nkp = nk + _sel(N_PROMPT, seg, NSEG)
    BT = BS[3]
    qb, qi, q_ok = _rows(grp, blk, BT, nq, G, SLOT_M)
    # the segment's token keys/values, then its prompt keys/values (broadcast strides,
    # often 0 over the batch), as one source
    spk_s, spv_s = _sel_st(spk, seg, NSEG), _sel_st(spv, seg, NSEG)
    PKs, PVs = _sel(PK, seg, NSEG), _sel(PV, seg, NSEG)
    cb, cj, kbo, vbo, pko, pvo = _kv_rows(grp, BT, BS, sk, sv, spk_s, spv_s, G, SLOT_N)
    if not WHILE:
        # the first K/V tile's DRAM reads start before Q is waited for: Q is a plain load
        # whose shared-memory store waits for it, and the pipeliner issues the K/V copies
        # after that store (docs/performance.md, "Q load"); prefetched, they hit L2
        ok0 = (cb < BT) & (cj < nkp)
        _prefetch_rows(_kp_rows(K, kbo, sk, k0, PKs, pko, spk_s, cj, nk), ok0, D)
        _prefetch_rows(_kp_rows(V, vbo, sv, k0, PVs, pvo, spv_s, cj, nk), ok0, D)
    q = _load(Q, _boff(qb, BS, sq), q0 + qi, sq, q_ok, D)
    m_i = tl.full([G * SLOT_M], float("-inf"), tl.float32)
    l_i = tl.zeros([G * SLOT_M], tl.float32)
    acc = tl.zeros([G * SLOT_M, D], tl.float32)
    if WHILE:
        j0 = 0
        while j0 < nkp:
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, kbo, vbo, sk, sv, PKs, PVs,
                                      pko, pvo, spk_s, spv_s, j0, k0, nk, nkp, cb, cj, BT,
                                      qk_scale, G, SLOT_N, D, PREC)
            j0 += SLOT_N
    else:
        for j0 in range(0, nkp, SLOT_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, kbo, vbo, sk, sv, PKs, PVs,
                                      pko, pvo, spk_s, spv_s, j0, k0, nk, nkp, cb, cj, BT,
                                      qk_scale, G, SLOT_N, D, PREC)
    # o = acc / l ;  lse = (m + log2 l) * ln 2
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store(O, _boff(qb, BS, so), q0 + qi, so, q_ok, acc / l_safe[:, None], D)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + qb.to(tl.int64) * LQ + q0 + qi, lse, mask=q_ok)


# --------------------------------------------------------------------------- backward
@triton.jit
def prompted_attn_delta(
    O, DO, DELTA, so, sdo, Q_LEN, BS, NB, LQ,
    G: tl.constexpr, SLOT_M: tl.constexpr, D: tl.constexpr, NSEG: tl.constexpr,
    PREC: tl.constexpr, WHILE: tl.constexpr,
):
    # delta_i = do_i . o_i  (fp32), for the fused backward (PREC, WHILE: unused, shared
    # launch constants)
    pid, seg = tl.program_id(0), tl.program_id(1)
    blk, grp = pid % NB, pid // NB
    nq, q0 = _sel(Q_LEN, seg, NSEG), _start(Q_LEN, seg, NSEG)
    if blk * SLOT_M < nq:
        qb, qi, q_ok = _rows(grp, blk, BS[3], nq, G, SLOT_M)
        do = _load(DO, _boff(qb, BS, sdo), q0 + qi, sdo, q_ok, D)
        o = _load(O, _boff(qb, BS, so), q0 + qi, so, q_ok, D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + qb.to(tl.int64) * LQ + q0 + qi, delta, mask=q_ok)


@triton.jit
def _kv_step(dk, dv, k, v, k_ok, Q, DO, DQA, LSE, DELTA, qbo, dbo, abo, sq, sdo, sdqa,
             m0, q0, nq, rb, ri, BT, LQ, qk_scale, scale, G: tl.constexpr,
             SLOT_M: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
             WITH_DQ: tl.constexpr):
    # keys j of this program against queries m0 + ri of their own sequence (transposed,
    # per-sequence tiles: column c of key row j is query m0 + c of j's sequence):
    #   sT_ji = q_i.k_j ; pT = 2^(sT - lse_i log2 e) ; dv += pT do ; dpT = v do^T
    #   dsT = pT (dpT - delta_i) ; dk += dsT q ; and (WITH_DQ) dq_i += scale dsT^T k
    ok = (rb < BT) & (m0 + ri < nq)
    q = _load(Q, qbo, q0 + m0 + ri, sq, ok, D)
    do = _load(DO, dbo, q0 + m0 + ri, sdo, ok, D)
    row = rb.to(tl.int64) * LQ + q0 + m0 + ri
    lse2 = tl.load(LSE + row, mask=ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=ok, other=0.0)
    N: tl.constexpr = k.shape[0] // G
    sT = _bdot(k, q, G, False, True, PREC) * qk_scale
    valid = _cols_ok(ok, m0, nq, G, SLOT_M)[None, :] & k_ok[:, None]
    pT = tl.where(valid, tl.exp2(sT - _bcol(lse2, G, N)), 0.0)
    dv += _bdot(pT.to(do.dtype), do, G, False, False, PREC)
    dpT = _bdot(v, do, G, False, True, PREC)
    dsT = pT * (dpT - _bcol(delta, G, N))
    dk += _bdot(dsT.to(q.dtype), q, G, False, False, PREC)
    if WITH_DQ:
        dq = _bdot(dsT.to(k.dtype), k, G, True, False, PREC) * scale
        tl.atomic_add(_ptr(DQA, abo, q0 + m0 + ri, sdqa, D), dq, mask=ok[:, None],
                      sem="relaxed")
    return dk, dv


@triton.jit
def _kv_block(dk, dv, k, v, k_ok, grp, Q, DO, DQA, LSE, DELTA, sq, sdo, sdqa, BS, q0, nq,
              LQ, qk_scale, scale, G: tl.constexpr, SLOT_M: tl.constexpr, D: tl.constexpr,
              PREC: tl.constexpr, WHILE: tl.constexpr, WITH_DQ: tl.constexpr):
    # dk, dv (unscaled dk) of key rows k, v over all query blocks of their sequences,
    # added to the given ones (zeros, or partial sums)
    BT = BS[3]
    rb, ri, _ = _rows(grp, 0, BT, 0, G, SLOT_M)
    qbo, dbo, abo = _boff(rb, BS, sq), _boff(rb, BS, sdo), _boff(rb, BS, sdqa)
    if WHILE:
        m0 = 0
        while m0 < nq:
            dk, dv = _kv_step(dk, dv, k, v, k_ok, Q, DO, DQA, LSE, DELTA, qbo, dbo, abo,
                              sq, sdo, sdqa, m0, q0, nq, rb, ri, BT, LQ, qk_scale, scale,
                              G, SLOT_M, D, PREC, WITH_DQ)
            m0 += SLOT_M
    else:
        for m0 in range(0, nq, SLOT_M):
            dk, dv = _kv_step(dk, dv, k, v, k_ok, Q, DO, DQA, LSE, DELTA, qbo, dbo, abo,
                              sq, sdo, sdqa, m0, q0, nq, rb, ri, BT, LQ, qk_scale, scale,
                              G, SLOT_M, D, PREC, WITH_DQ)
    return dk, dv


@triton.jit
def _program(Q_LEN, K_LEN, BS, NB, NSEG: tl.constexpr):
    # the backward kernels' program (grid: blocks x groups on axis 0, segment on axis 1):
    # its block, sequence group and segment, the segment's query/key lengths and starts,
    # and the number of sequences BT
    pid, seg = tl.program_id(0), tl.program_id(1)
    nq, nk = _sel(Q_LEN, seg, NSEG), _sel(K_LEN, seg, NSEG)
    q0, k0 = _start(Q_LEN, seg, NSEG), _start(K_LEN, seg, NSEG)
    return pid % NB, pid // NB, seg, nq, nk, q0, k0, BS[3]


@triton.jit
def prompted_attn_bwd(
    Q, K, V, DO, DK, DV, DQA, LSE, DELTA, sq, sk, sv, sdo, sdk, sdv, sdqa,
    PK, PV, spk, spv, N_PROMPT, GR, sgr, GKV, Q_LEN, K_LEN, BS, NKB, NB, LQ, qk_scale, scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr, SLOT_P: tl.constexpr,
    D: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr, WHILE: tl.constexpr,
):
    # The fused backward (5 matrix products per tile pair): one program per key block
    # -- NKB token-key blocks, then the prompt blocks -- walks the queries of its
    # sequences and computes dk/dv of its keys and adds scale * ds^T k into the fp32 dq
    # accumulator DQA (atomics).  Prompt blocks add scale * ds^T q and p^T do into GR
    # (fp32, the prompt's own shape addressed through its broadcast strides; dpv at
    # + GKV), so the batch reduction happens in the atomics.
    kblk, grp, seg, nq, nk, q0, k0, BT = _program(Q_LEN, K_LEN, BS, NB, NSEG)
    if kblk < NKB:
        if kblk * SLOT_N < nk:
            kb, kj, k_ok = _rows(grp, kblk, BT, nk, G, SLOT_N)
            k = _load(K, _boff(kb, BS, sk), k0 + kj, sk, k_ok, D)
            v = _load(V, _boff(kb, BS, sv), k0 + kj, sv, k_ok, D)
            z = tl.zeros([G * SLOT_N, D], tl.float32)
            dk, dv = _kv_block(z, z, k, v, k_ok, grp, Q, DO, DQA, LSE, DELTA, sq, sdo, sdqa,
                               BS, q0, nq, LQ, qk_scale, scale, G, SLOT_M, D, PREC, WHILE,
                               True)
            _store(DK, _boff(kb, BS, sdk), k0 + kj, sdk, k_ok, dk * scale, D)
            _store(DV, _boff(kb, BS, sdv), k0 + kj, sdv, k_ok, dv, D)
    else:
        pblk = kblk - NKB
        P = _sel(N_PROMPT, seg, NSEG)
        if pblk * SLOT_P < P:
            spk_s, spv_s, sgr_s = _sel_st(spk, seg, NSEG), _sel_st(spv, seg, NSEG), \
                _sel_st(sgr, seg, NSEG)
            pb, pj, p_ok = _rows(grp, pblk, BT, P, G, SLOT_P)
            k = _load(_sel(PK, seg, NSEG), _boff(pb, BS, spk_s), pj, spk_s, p_ok, D)
            v = _load(_sel(PV, seg, NSEG), _boff(pb, BS, spv_s), pj, spv_s, p_ok, D)
            z = tl.zeros([G * SLOT_P, D], tl.float32)
            dk, dv = _kv_block(z, z, k, v, p_ok, grp, Q, DO, DQA, LSE, DELTA, sq, sdo, sdqa,
                               BS, q0, nq, LQ, qk_scale, scale, G, SLOT_M, D, PREC, WHILE,
                               True)
            gptr = _ptr(_sel(GR, seg, NSEG), _boff(pb, BS, sgr_s), pj, sgr_s, D)
            tl.atomic_add(gptr, dk * scale, mask=p_ok[:, None], sem="relaxed")
            tl.atomic_add(gptr + _sel(GKV, seg, NSEG), dv, mask=p_ok[:, None], sem="relaxed")


# ----------------------------------------------------------------- deterministic backward
@triton.jit
def _probs(q, do, k, v, lse2, delta, valid, qk_scale, G: tl.constexpr, PREC: tl.constexpr):
    # p_ij = 2^(s_ij - lse_i log2 e) ;  ds_ij = p_ij (do_i.v_j - delta_i)  (per sequence)
    s = _bdot(q, k, G, False, True, PREC) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _bdot(do, v, G, False, True, PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dq_step(dq, q, do, q_ok, lse2, delta, KP, VP, kbo, vbo, sk, sv, j0, jo, n, cb, cj,
             BT, qk_scale, G: tl.constexpr, SLOT: tl.constexpr, D: tl.constexpr,
             PREC: tl.constexpr):
    ok = (cb < BT) & (j0 + cj < n)
    k = _load(KP, kbo, jo + j0 + cj, sk, ok, D)
    v = _load(VP, vbo, jo + j0 + cj, sv, ok, D)
    valid = q_ok[:, None] & _cols_ok(ok, j0, n, G, SLOT)[None, :]
    p, ds = _probs(q, do, k, v, lse2, delta, valid, qk_scale, G, PREC)
    dq += _bdot(ds.to(k.dtype), k, G, False, False, PREC)
    return dq, p, ds, ok


@triton.jit
def prompted_attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, sq, sk, sv, so, sdo, sdq,
    PK, PV, spk, spv, N_PROMPT, GR, sgr, GM, GKV, Q_LEN, K_LEN, BS, NB, LQ, qk_scale, scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr, SLOT_P: tl.constexpr,
    D: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr, WHILE: tl.constexpr,
):
    # Deterministic mode, pass 1 (no atomics): delta_i = do_i.o_i (stored for pass 2);
    # dq_i = scale sum_j ds_ij k_j over token keys and prompts; per prompt j, this
    # program's partial dpk_j = scale sum_i ds_ij q_i and dpv_j = sum_i p_ij do_i, stored
    # at [b, blk, j] of GR (block stride GM), reduced on the host in a fixed order.
    blk, grp, seg, nq, nk, q0, k0, BT = _program(Q_LEN, K_LEN, BS, NB, NSEG)
    if blk * SLOT_M < nq:
        qb, qi, q_ok = _rows(grp, blk, BT, nq, G, SLOT_M)
        q = _load(Q, _boff(qb, BS, sq), q0 + qi, sq, q_ok, D)
        do = _load(DO, _boff(qb, BS, sdo), q0 + qi, sdo, q_ok, D)
        o = _load(O, _boff(qb, BS, so), q0 + qi, so, q_ok, D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        row = qb.to(tl.int64) * LQ + q0 + qi
        tl.store(DELTA + row, delta, mask=q_ok)
        lse2 = tl.load(LSE + row, mask=q_ok, other=0.0) * 1.4426950408889634
        dq = tl.zeros([G * SLOT_M, D], tl.float32)

        cb, cj, _ = _rows(grp, 0, BT, 0, G, SLOT_N)
        kbo, vbo = _boff(cb, BS, sk), _boff(cb, BS, sv)
        if WHILE:
            n0 = 0
            while n0 < nk:
                dq, p, ds, ok = _dq_step(dq, q, do, q_ok, lse2, delta, K, V, kbo, vbo, sk,
                                         sv, n0, k0, nk, cb, cj, BT, qk_scale, G, SLOT_N, D,
                                         PREC)
                n0 += SLOT_N
        else:
            for n0 in range(0, nk, SLOT_N):
                dq, p, ds, ok = _dq_step(dq, q, do, q_ok, lse2, delta, K, V, kbo, vbo, sk,
                                         sv, n0, k0, nk, cb, cj, BT, qk_scale, G, SLOT_N, D,
                                         PREC)

        P = _sel(N_PROMPT, seg, NSEG)
        PKs, PVs, GRs = _sel(PK, seg, NSEG), _sel(PV, seg, NSEG), _sel(GR, seg, NSEG)
        spk_s, spv_s, sgr_s = _sel_st(spk, seg, NSEG), _sel_st(spv, seg, NSEG), \
            _sel_st(sgr, seg, NSEG)
        pb, pj, _ = _rows(grp, 0, BT, 0, G, SLOT_P)
        pko, pvo = _boff(pb, BS, spk_s), _boff(pb, BS, spv_s)
        gro = _boff(pb, BS, sgr_s) + blk * _sel(GM, seg, NSEG)
        gkv = _sel(GKV, seg, NSEG)
        # prompts: a static trip count would need P at compile time; P <= SLOT_P * steps
        if WHILE:
            p0 = 0
            while p0 < P:
                dq, p, ds, ok = _dq_step(dq, q, do, q_ok, lse2, delta, PKs, PVs, pko, pvo,
                                         spk_s, spv_s, p0, 0, P, pb, pj, BT, qk_scale, G,
                                         SLOT_P, D, PREC)
                _prompt_partial(GRs, gro, gkv, p0 + pj, sgr_s, ok, ds, p, q, do, scale, G, D,
                                PREC)
                p0 += SLOT_P
        else:
            for p0 in range(0, P, SLOT_P):
                dq, p, ds, ok = _dq_step(dq, q, do, q_ok, lse2, delta, PKs, PVs, pko, pvo,
                                         spk_s, spv_s, p0, 0, P, pb, pj, BT, qk_scale, G,
                                         SLOT_P, D, PREC)
                _prompt_partial(GRs, gro, gkv, p0 + pj, sgr_s, ok, ds, p, q, do, scale, G, D,
                                PREC)
        _store(DQ, _boff(qb, BS, sdq), q0 + qi, sdq, q_ok, dq * scale, D)


@triton.jit
def _prompt_partial(GRs, gro, gkv, pos, sgr, ok, ds, p, q, do, scale, G: tl.constexpr,
                    D: tl.constexpr, PREC: tl.constexpr):
    gk = _bdot(ds.to(q.dtype), q, G, True, False, PREC) * scale
    gv = _bdot(p.to(do.dtype), do, G, True, False, PREC)
    gptr = _ptr(GRs, gro, pos, sgr, D)
    tl.store(gptr, gk, mask=ok[:, None])
    tl.store(gptr + gkv, gv, mask=ok[:, None])


@triton.jit
def prompted_attn_bwd_dkv(
    Q, K, V, DO, DK, DV, LSE, DELTA, sq, sk, sv, sdo, sdk, sdv,
    Q_LEN, K_LEN, BS, NB, LQ, qk_scale, scale,
    G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr, D: tl.constexpr,
    NSEG: tl.constexpr, PREC: tl.constexpr, WHILE: tl.constexpr,
):
    # Deterministic mode, pass 2: dk/dv of this program's token keys (no dq, no atomics)
    blk, grp, seg, nq, nk, q0, k0, BT = _program(Q_LEN, K_LEN, BS, NB, NSEG)
    if blk * SLOT_N < nk:
        kb, kj, k_ok = _rows(grp, blk, BT, nk, G, SLOT_N)
        k = _load(K, _boff(kb, BS, sk), k0 + kj, sk, k_ok, D)
        v = _load(V, _boff(kb, BS, sv), k0 + kj, sv, k_ok, D)
        z = tl.zeros([G * SLOT_N, D], tl.float32)
        dk, dv = _kv_block(z, z, k, v, k_ok, grp, Q, DO, DO, LSE, DELTA, sq, sdo, sdo, BS,
                           q0, nq, LQ, qk_scale, scale, G, SLOT_M, D, PREC, WHILE, False)
        _store(DK, _boff(kb, BS, sdk), k0 + kj, sdk, k_ok, dk * scale, D)
        _store(DV, _boff(kb, BS, sdv), k0 + kj, sdv, k_ok, dv, D)


# ------------------------------------------------------- sequence-owning backward (short)
@triton.jit
def _load_kp(KP, kbo, sk, k0, PP, pbo, sp, j, nk, ok, D: tl.constexpr):
    # rows j of a sequence's combined key source: token keys j < nk (at k0 + j), then its
    # prompts (row j - nk); ok says j < nk + P (and the sequence exists)
    # (one load through a per-row choice of pointer, not two loads and a select)
    ptr = tl.where((j < nk)[:, None], _ptr(KP, kbo, k0 + j, sk, D),
                   _ptr(PP, pbo, j - nk, sp, D))
    return tl.load(ptr, mask=ok[:, None], other=0.0)


@triton.jit
def _kp_rows(KP, kbo, sk, k0, PP, pbo, sp, j, nk):
    # the first element of rows j of a sequence's combined key source (see _load_kp)
    return tl.where(j < nk, KP + kbo + (k0 + j).to(tl.int64) * sk[4],
                    PP + pbo + (j - nk).to(tl.int64) * sp[4])


@triton.jit
def _prefetch_rows(ptr, ok, D: tl.constexpr):
    # ask L2 for rows ptr[r] .. ptr[r] + D elements (rows with ok) without waiting: one
    # `prefetch.global.L2` per 32-byte sector of a row, each (row, sector) once across the
    # program's threads (a row whose start is not 32-byte aligned leaves its last partial
    # sector to the copy).  A hint: its dummy results are unused; compiled kernels only
    # (the interpreter runs no PTX)
    ROWB: tl.constexpr = D * ptr.dtype.element_ty.primitive_bitwidth // 8
    NSEC: tl.constexpr = (ROWB + 31) // 32
    a = tl.cast(ptr, tl.int64)[:, None] + (tl.arange(0, NSEC) * 32)[None, :]
    m = tl.broadcast_to(ok.to(tl.int32)[:, None], a.shape)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [a, m], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _seq_q_tile(m0, qb, qi, Q, O, DO, DQ, LSE, DELTA, qbo, obo, dbo, dqo, sq, so, sdo, sdq,
                K, V, kbo, vbo, sk, sv, PKs, PVs, pko, pvo, spk_s, spv_s, cb, cj, k0, nk,
                nkp, q0, nq, BT, LQ, qk_scale, scale, G: tl.constexpr, SLOT_M: tl.constexpr,
                SLOT_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                WHILE: tl.constexpr, ST1: tl.constexpr):
    # one query tile m0 of the program's sequences: delta = rowsum(do o) (kept in DELTA
    # for the key pass), dq over the combined key tiles (S, dP, dQ), written once in the
    # caller's dtype and layout
    q_ok = (qb < BT) & (m0 + qi < nq)
    pos = q0 + m0 + qi
    q = _load(Q, qbo, pos, sq, q_ok, D)
    do = _load(DO, dbo, pos, sdo, q_ok, D)
    o = _load(O, obo, pos, so, q_ok, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = qb.to(tl.int64) * LQ + pos
    tl.store(DELTA + row, delta, mask=q_ok)
    lse2 = tl.load(LSE + row, mask=q_ok, other=0.0) * 1.4426950408889634
    dq = tl.zeros([G * SLOT_M, D], tl.float32)
    if WHILE:
        n0 = 0
        while n0 < nkp:
            dq = _seq_dq_step(dq, q, do, q_ok, lse2, delta, K, V, kbo, vbo, sk, sv, PKs,
                              PVs, pko, pvo, spk_s, spv_s, n0, k0, nk, nkp, cb, cj, BT,
                              qk_scale, G, SLOT_N, D, PREC)
            n0 += SLOT_N
    else:
        for n0 in tl.range(0, nkp, SLOT_N, num_stages=ST1):
            dq = _seq_dq_step(dq, q, do, q_ok, lse2, delta, K, V, kbo, vbo, sk, sv, PKs,
                              PVs, pko, pvo, spk_s, spv_s, n0, k0, nk, nkp, cb, cj, BT,
                              qk_scale, G, SLOT_N, D, PREC)
    _store(DQ, dqo, pos, sdq, q_ok, dq * scale, D)


@triton.jit
def _seq_dq_step(dq, q, do, q_ok, lse2, delta, K, V, kbo, vbo, sk, sv, PKs, PVs, pko, pvo,
                 spk_s, spv_s, n0, k0, nk, nkp, cb, cj, BT, qk_scale, G: tl.constexpr,
                 SLOT: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    # keys n0 + cj of the combined source (token keys, then prompts)
    j = n0 + cj
    ok = (cb < BT) & (j < nkp)
    k = _load_kp(K, kbo, sk, k0, PKs, pko, spk_s, j, nk, ok, D)
    v = _load_kp(V, vbo, sv, k0, PVs, pvo, spv_s, j, nk, ok, D)
    valid = q_ok[:, None] & _cols_ok(ok, n0, nkp, G, SLOT)[None, :]
    p, ds = _probs(q, do, k, v, lse2, delta, valid, qk_scale, G, PREC)
    return dq + _bdot(ds.to(k.dtype), k, G, False, False, PREC)


@triton.jit
def _seq_kv_tile(n0, c, g, GS, Q, K, V, DO, DK, DV, LSE, DELTA, sq, sk, sv, sdo, sdk, sdv,
                 PKs, PVs, spk_s, spv_s, GRs, gkv, BS, q0, k0, nq, nk, nkp, LQ, qk_scale,
                 scale, NS: tl.constexpr, G: tl.constexpr, SLOT_M: tl.constexpr,
                 SLOT_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                 WHILE: tl.constexpr, HAS_P: tl.constexpr):
    # Combined key tile n0 (S, dP, dV, dK over all query tiles) of the program's NS
    # sequence groups sg = (c NS + i) GS + g, one after the other.  Token rows are each
    # group's own: written after its step.  Prompt rows are shared by the groups: their
    # dk, dv stay in the accumulators from one group to the next (the token rows are
    # cleared), and after the last group the sum is written once, in fp32, to the
    # program's partial row set (c GS + g) G + r // SLOT_N of GR.
    BT = BS[3]
    _, kj, _ = _rows(0, 0, BT, 0, G, SLOT_N)
    j = n0 + kj
    prm = (j >= nk) & (j < nkp)
    dk = tl.zeros([G * SLOT_N, D], tl.float32)
    dv = tl.zeros([G * SLOT_N, D], tl.float32)
    for i in range(NS):
        sg = (c * NS + i) * GS + g
        kb, _, _ = _rows(sg, 0, BT, 0, G, SLOT_N)
        k_ok = (kb < BT) & (j < nkp)
        kbo, vbo = _boff(kb, BS, sk), _boff(kb, BS, sv)
        pko, pvo = _boff(kb, BS, spk_s), _boff(kb, BS, spv_s)
        k = _load_kp(K, kbo, sk, k0, PKs, pko, spk_s, j, nk, k_ok, D)
        v = _load_kp(V, vbo, sv, k0, PVs, pvo, spv_s, j, nk, k_ok, D)
        dk, dv = _kv_block(dk, dv, k, v, k_ok, sg, Q, DO, DO, LSE, DELTA, sq, sdo, sdo, BS,
                           q0, nq, LQ, qk_scale, scale, G, SLOT_M, D, PREC, WHILE, False)
        tok = k_ok & (j < nk)
        _store(DK, _boff(kb, BS, sdk), k0 + j, sdk, tok, dk * scale, D)
        _store(DV, _boff(kb, BS, sdv), k0 + j, sdv, tok, dv, D)
        if NS > 1:
            dk = tl.where(prm[:, None], dk, 0.0)
            dv = tl.where(prm[:, None], dv, 0.0)
    if HAS_P:
        grp = c * GS + g
        if G == 1:      # a scalar offset: nothing per row
            gro = grp.to(tl.int64) * ((nkp - nk) * D)
            ok = prm
        else:
            kb, _, _ = _rows(grp, 0, BT, 0, G, SLOT_N)
            gro = (kb.to(tl.int64) * ((nkp - nk) * D))[:, None]
            ok = prm & (kb < BT)
        gptr = GRs + gro + (j - nk).to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(gptr, dk * scale, mask=ok[:, None])
        tl.store(gptr + gkv, dv, mask=ok[:, None])


@triton.jit
def prompted_attn_bwd_seq(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, sq, sk, sv, so, sdo, sdq, sdk, sdv,
    PK, PV, spk, spv, N_PROMPT, GR, GV, sgr, GKV, Q_LEN, K_LEN, BS, LQ, qk_scale, scale, GS, NIT,
    NS: tl.constexpr, G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_MB: tl.constexpr,
    SLOT_N: tl.constexpr, D: tl.constexpr, NSEG: tl.constexpr, HAS_P: tl.constexpr,
    PREC: tl.constexpr, WHILE: tl.constexpr, ST1: tl.constexpr, ONE: tl.constexpr,
    DIRECT: tl.constexpr,
):
    # The sequence-owning backward of short sequences (the tile table's "seq" rule): one
    # program per (sequence group, segment) -- grid axis 0 = group * NSEG + segment -- so
    # no other program touches its sequences' dq, dk, dv: nothing is accumulated in global
    # memory and nothing needs zeroing.  Keys are walked as one combined source, the
    # segment's token keys and then its prompts (a sequence's prompts share its last key
    # tile where they fit: 10 keys + 2 prompts are one 16-slot tile):
    #   pass 1, query-outer: per query tile, delta = rowsum(do o) and dq over all key
    #     tiles (S, dP, dQ), written once in the input dtype and the caller's layout;
    #   pass 2, key-outer: per key tile, dk, dv over all query tiles (S, dP, dV, dK),
    #     reading the deltas pass 1 left in DELTA (same program, after a barrier); token
    #     rows are written to dk, dv, prompt rows (their dk, dv: the prompt gradients of
    #     the program's sequences, summed on chip over the NS groups it owns) once to the
    #     program's fp32 partial in GR (no atomics; the batch reduction is a second,
    #     deterministic step).
    # Program grp owns the NS groups sg = (c NS + i) GS + g, grp = c GS + g (see below).
    # 7 products per tile pair (S and dP twice) and no atomics: bit-exact, so the
    # deterministic mode uses it as well.
    pid = tl.program_id(0)
    seg, grp = pid % NSEG, pid // NSEG
    nq, nk = _sel(Q_LEN, seg, NSEG), _sel(K_LEN, seg, NSEG)
    q0, k0 = _start(Q_LEN, seg, NSEG), _start(K_LEN, seg, NSEG)
    BT = BS[3]
    nkp = nk + _sel(N_PROMPT, seg, NSEG)
    spk_s, spv_s, sgr_s = _sel_st(spk, seg, NSEG), _sel_st(spv, seg, NSEG), \
        _sel_st(sgr, seg, NSEG)
    PKs, PVs, GRs, gkv = _sel(PK, seg, NSEG), _sel(PV, seg, NSEG), _sel(GR, seg, NSEG), \
        _sel(GKV, seg, NSEG)
    if ONE:
        # every sequence is one query tile and one key tile (packed short sequences, e.g.
        # 10 queries, 10 keys + 2 prompts in 16 slots): S and dP once, 5 products
        if DIRECT:
            # the program's sequences share their prompts (GS = the product of the batch
            # dims the prompts are not broadcast over): it sums their prompt gradients
            # over all NIT steps and writes them once, in the prompts' dtype, to GR and GV
            # (dpk and dpv themselves, (*lead, P, D) dense): no partials, no second launch
            gk = tl.zeros([SLOT_N, D], tl.float32)
            gv = tl.zeros([SLOT_N, D], tl.float32)
            # twin loops on purpose (module docstring, WHILE): same body, while/range form
            if WHILE:
                it = 0
                while it < NIT:
                    dk, dv = _seq_one(grp, it, GS, Q, O, DO, DQ, DK, DV, LSE, K, V, PKs, PVs,
                                      GRs, sq, so, sdo, sdq, sk, sv, sdk, sdv, spk_s, spv_s,
                                      sgr_s, gkv, BS, q0, k0, nq, nk, nkp, LQ, qk_scale,
                                      scale, G, SLOT_M, SLOT_N, D, PREC, HAS_P, True)
                    gk += dk
                    gv += dv
                    it += 1
            else:
                for it in range(0, NIT):
                    dk, dv = _seq_one(grp, it, GS, Q, O, DO, DQ, DK, DV, LSE, K, V, PKs, PVs,
                                      GRs, sq, so, sdo, sdq, sk, sv, sdk, sdv, spk_s, spv_s,
                                      sgr_s, gkv, BS, q0, k0, nq, nk, nkp, LQ, qk_scale,
                                      scale, G, SLOT_M, SLOT_N, D, PREC, HAS_P, True)
                    gk += dk
                    gv += dv
            c = tl.arange(0, SLOT_N)
            prm = (c >= nk) & (c < nkp)
            P = nkp - nk
            o = grp.to(tl.int64) * P * D + (c - nk)[:, None] * D + tl.arange(0, D)[None, :]
            tl.store(GRs + o, gk.to(GRs.dtype.element_ty), mask=prm[:, None])
            GVs = _sel(GV, seg, NSEG)
            tl.store(GVs + o, gv.to(GVs.dtype.element_ty), mask=prm[:, None])
        else:
            _seq_one(grp, 0, 0, Q, O, DO, DQ, DK, DV, LSE, K, V, PKs, PVs, GRs, sq, so, sdo,
                     sdq, sk, sv, sdk, sdv, spk_s, spv_s, sgr_s, gkv, BS, q0, k0, nq, nk, nkp,
                     LQ, qk_scale, scale, G, SLOT_M, SLOT_N, D, PREC, HAS_P, False)
        return
    # Spatial / fusion: the program owns NS sequence groups that share their prompts,
    # sg = (c NS + i) GS + g for program grp = c GS + g (GS: the product of the batch dims
    # the prompts are not broadcast over, which trail; NS = GS = 1: sg = grp), and keeps
    # ONE fp32 partial of their prompt gradients (summed on chip in a fixed order): the
    # partials, written here and read by the reduction, shrink NS-fold.  A group past
    # the batch (the last program's, when NS does not divide the sequences sharing a
    # prompt row set) is masked out.
    c, g = grp // GS, grp % GS
    # pass 1: delta and dq of each group, query tile by query tile
    for i in range(NS):
        sg = (c * NS + i) * GS + g
        qb, qi, _ = _rows(sg, 0, BT, 0, G, SLOT_M)
        qbo, obo, dbo, dqo = _boff(qb, BS, sq), _boff(qb, BS, so), _boff(qb, BS, sdo), \
            _boff(qb, BS, sdq)
        cb, cj, kbo, vbo, pko, pvo = _kv_rows(sg, BT, BS, sk, sv, spk_s, spv_s, G, SLOT_N)
        if WHILE:
            m0 = 0
            while m0 < nq:
                _seq_q_tile(m0, qb, qi, Q, O, DO, DQ, LSE, DELTA, qbo, obo, dbo, dqo, sq, so,
                            sdo, sdq, K, V, kbo, vbo, sk, sv, PKs, PVs, pko, pvo, spk_s,
                            spv_s, cb, cj, k0, nk, nkp, q0, nq, BT, LQ, qk_scale, scale, G,
                            SLOT_M, SLOT_N, D, PREC, WHILE, ST1)
                m0 += SLOT_M
        else:
            for m0 in tl.range(0, nq, SLOT_M, num_stages=1):
                _seq_q_tile(m0, qb, qi, Q, O, DO, DQ, LSE, DELTA, qbo, obo, dbo, dqo, sq, so,
                            sdo, sdq, K, V, kbo, vbo, sk, sv, PKs, PVs, pko, pvo, spk_s,
                            spv_s, cb, cj, k0, nk, nkp, q0, nq, BT, LQ, qk_scale, scale, G,
                            SLOT_M, SLOT_N, D, PREC, WHILE, ST1)
    # the deltas stored above are read back below by other threads of this program
    tl.debug_barrier()
    # pass 2: dk, dv (and the prompts' partial), key tile by key tile, each tile over the
    # NS groups
    if WHILE:
        n0 = 0
        while n0 < nkp:
            _seq_kv_tile(n0, c, g, GS, Q, K, V, DO, DK, DV, LSE, DELTA, sq, sk, sv, sdo, sdk,
                         sdv, PKs, PVs, spk_s, spv_s, GRs, gkv, BS, q0, k0, nq, nk, nkp, LQ,
                         qk_scale, scale, NS, G, SLOT_MB, SLOT_N, D, PREC, WHILE, HAS_P)
            n0 += SLOT_N
    else:
        for n0 in tl.range(0, nkp, SLOT_N, num_stages=1):
            _seq_kv_tile(n0, c, g, GS, Q, K, V, DO, DK, DV, LSE, DELTA, sq, sk, sv, sdo, sdk,
                         sdv, PKs, PVs, spk_s, spv_s, GRs, gkv, BS, q0, k0, nq, nk, nkp, LQ,
                         qk_scale, scale, NS, G, SLOT_MB, SLOT_N, D, PREC, WHILE, HAS_P)


@triton.jit
def _rows_it(grp, it, GS, BT, n, G: tl.constexpr, SLOT: tl.constexpr):
    # like _rows, for the direct prompt-gradient mode: sequence g of step it of program
    # grp is b = (it G + g) GS + grp -- all of a program's sequences share the prompt rows
    # (the batch dims the prompts are broadcast over lead, GS = the other dims' product)
    r = tl.arange(0, G * SLOT)
    b = (it * G + r // SLOT) * GS + grp
    pos = r % SLOT
    return b, pos, (b < BT) & (pos < n)


@triton.jit
def _seq_one(grp, it, GS, Q, O, DO, DQ, DK, DV, LSE, K, V, PKs, PVs, GRs, sq, so, sdo, sdq,
             sk, sv, sdk, sdv, spk_s, spv_s, sgr_s, gkv, BS, q0, k0, nq, nk, nkp, LQ, qk_scale,
             scale, G: tl.constexpr, SLOT_M: tl.constexpr, SLOT_N: tl.constexpr,
             D: tl.constexpr, PREC: tl.constexpr, HAS_P: tl.constexpr, DIRECT: tl.constexpr):
    # One step for G whole sequences; returns their prompt rows' dk, dv (DIRECT: summed
    # by the caller; else stored as per-sequence partials here)
    BT = BS[3]
    if DIRECT:
        qb, qi, q_ok = _rows_it(grp, it, GS, BT, nq, G, SLOT_M)
        kb, j, _ = _rows_it(grp, it, GS, BT, 0, G, SLOT_N)
    else:
        qb, qi, q_ok = _rows(grp, 0, BT, nq, G, SLOT_M)
        kb, j, _ = _rows(grp, 0, BT, 0, G, SLOT_N)
    pos = q0 + qi
    q = _load(Q, _boff(qb, BS, sq), pos, sq, q_ok, D)
    do = _load(DO, _boff(qb, BS, sdo), pos, sdo, q_ok, D)
    o = _load(O, _boff(qb, BS, so), pos, so, q_ok, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse2 = tl.load(LSE + qb.to(tl.int64) * LQ + pos, mask=q_ok, other=0.0) * 1.4426950408889634
    k_ok = (kb < BT) & (j < nkp)
    kbo, vbo = _boff(kb, BS, sk), _boff(kb, BS, sv)
    pko, pvo = _boff(kb, BS, spk_s), _boff(kb, BS, spv_s)
    k = _load_kp(K, kbo, sk, k0, PKs, pko, spk_s, j, nk, k_ok, D)
    v = _load_kp(V, vbo, sv, k0, PVs, pvo, spv_s, j, nk, k_ok, D)
    valid = q_ok[:, None] & _cols_ok(k_ok, 0, nkp, G, SLOT_N)[None, :]
    p, ds = _probs(q, do, k, v, lse2, delta, valid, qk_scale, G, PREC)
    dq = _bdot(ds.to(k.dtype), k, G, False, False, PREC)
    _store(DQ, _boff(qb, BS, sdq), pos, sdq, q_ok, dq * scale, D)
    tok = k_ok & (j < nk)
    dv = _bdot(p.to(do.dtype), do, G, True, False, PREC)
    _store(DV, _boff(kb, BS, sdv), k0 + j, sdv, tok, dv, D)
    dk = _bdot(ds.to(q.dtype), q, G, True, False, PREC) * scale
    _store(DK, _boff(kb, BS, sdk), k0 + j, sdk, tok, dk, D)
    if DIRECT:
        # the G sequences share their prompts: one plain (not per-sequence) product over
        # all G SLOT_M query rows sums their prompt gradients; rows c >= nk of the
        # [SLOT_N, D] results are prompts c - nk (the token rows mix sequences: unused).
        # (The launcher uses G = 1 here, where they are the dk, dv products.)
        if G == 1:
            gk, gv = dk, dv
        else:
            gk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
            gv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    else:
        if HAS_P:
            prm = k_ok & (j >= nk)
            gptr = _ptr(GRs, _boff(kb, BS, sgr_s), j - nk, sgr_s, D)
            tl.store(gptr, dk, mask=prm[:, None])
            tl.store(gptr + gkv, dv, mask=prm[:, None])
        gk = tl.zeros([SLOT_N, D], tl.float32)
        gv = tl.zeros([SLOT_N, D], tl.float32)
    return gk, gv


# ------------------------------------------------------------ prompt-gradient reduction
@triton.jit
def prompted_attn_pgrad(
    GR, GKV, OK, OV, N_PROMPT, KS, RS, BS, PE,
    RB: tl.constexpr, D: tl.constexpr, NSEG: tl.constexpr, WHILE: tl.constexpr,
):
    # dpk, dpv of each segment's prompts from the sequence-owning backward's partials
    # GR[s] ((2, *batch, P, D) fp32, dense; dpv at + GKV[s]).  Program (l * P + p, s):
    # prompt row p of output row set l (a flat index over the merged batch dims the
    # prompt is not broadcast over, sizes KS[s], 1 elsewhere) sums the partials of every
    # sequence b that broadcasts to it (the other dims, sizes RS[s]), RB sequences per
    # step, in a fixed order (deterministic), then casts to the prompt's dtype:
    # OK[s] / OV[s], (*lead, P, D) dense.  Grid: (max rows x P, NSEG).
    pid, seg = tl.program_id(0), tl.program_id(1)
    ks, rs = _sel_st(KS, seg, NSEG), _sel_st(RS, seg, NSEG)
    P = _sel(N_PROMPT, seg, NSEG)
    nl = ks[0] * ks[1] * ks[2] * ks[3]
    nr = rs[0] * rs[1] * rs[2] * rs[3]
    if P > 0:
        l, p = pid // P, pid % P
        if l < nl:
            # kept coordinates of l
            k0, k1, k2, k3 = _unravel4(l, ks[1], ks[2], ks[3])
            G = _sel(GR, seg, NSEG)
            gkv = _sel(GKV, seg, NSEG)
            pe = _sel(PE, seg, NSEG)
            d = tl.arange(0, D)
            ak = tl.zeros([D], tl.float32)
            av = tl.zeros([D], tl.float32)
            S1, S2, S3 = BS[0], BS[1], BS[2]
            if WHILE:
                r0 = 0
                while r0 < nr:
                    ak, av = _pg_step(ak, av, G, gkv, pe, p, d, r0, nr, rs, k0, k1, k2, k3,
                                      S1, S2, S3, RB, D)
                    r0 += RB
            else:
                for r0 in range(0, nr, RB):
                    ak, av = _pg_step(ak, av, G, gkv, pe, p, d, r0, nr, rs, k0, k1, k2, k3,
                                      S1, S2, S3, RB, D)
            Ks, Vs = _sel(OK, seg, NSEG), _sel(OV, seg, NSEG)
            o = l.to(tl.int64) * pe + p * D + d
            tl.store(Ks + o, ak.to(Ks.dtype.element_ty))
            tl.store(Vs + o, av.to(Vs.dtype.element_ty))


@triton.jit
def _pg_step(ak, av, G, gkv, pe, p, d, r0, nr, rs, k0, k1, k2, k3, S1, S2, S3,
             RB: tl.constexpr, D: tl.constexpr):
    # RB sequences r0 + i (flat over the reduced dims) of the kept coordinates k*
    r = r0 + tl.arange(0, RB)
    r3 = r % rs[3]
    t = r // rs[3]
    r2 = t % rs[2]
    t = t // rs[2]
    r1 = t % rs[1]
    r0_ = t // rs[1]
    b = (((k0 + r0_) * S1 + (k1 + r1)) * S2 + (k2 + r2)) * S3 + (k3 + r3)
    ptr = G + b.to(tl.int64)[:, None] * pe + p * D + d[None, :]
    ok = (r < nr)[:, None]
    ak += tl.sum(tl.load(ptr, mask=ok, other=0.0), 0)
    av += tl.sum(tl.load(ptr + gkv, mask=ok, other=0.0), 0)
    return ak, av
