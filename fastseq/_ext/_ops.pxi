# Small fused CPU kernels for the layers around the LSTM: each replaces a handful of NumPy calls
# (whose fixed cost, a few microseconds each, dominates at these sizes) by one pass (C in
# fs_ops.h).
#
# NumPy equivalents (see fastseq.functions.softmax_cross_entropy and fastseq.layers.TimeEmbedding,
# which fall back to them):
#     softmax_xent(S, labels, ignore) -> loss (rows in chunks on fastseq's threads):
#         S -= S.max(1)[:, None];  picked = S[i, labels[i]];  E = exp(S);  z = E.sum(1)
#         loss = sum over valid rows of (log(z) - picked) / n_valid
#         S[...] = E / z / n_valid, minus 1 / n_valid at each label; 0 on ignored rows
#     embed_gather(W, ids, out) -> -1:              out[...] = W[ids]   (or the flat position of
#                                                   the first id outside [0, V), nothing written)
#     embed_scatter(dW, ids, d, accumulate):        dW[...] = 0 unless accumulate;
#                                                   np.add.at(dW, ids.ravel(), d.reshape(-1, D))


cdef extern from "fs_ops.h":
    void fs_softmax_rowsf(float *S, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t V,
                          const int64_t *labels, int64_t ignore, int has_ignore, double denom,
                          double *loss) noexcept nogil
    void fs_softmax_rowsd(double *S, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t V,
                          const int64_t *labels, int64_t ignore, int has_ignore, double denom,
                          double *loss) noexcept nogil
    Py_ssize_t fs_embed_gatherf(const float *W, Py_ssize_t V, Py_ssize_t D, const int64_t *ids,
                                Py_ssize_t n, float *out) noexcept nogil
    Py_ssize_t fs_embed_gatherd(const double *W, Py_ssize_t V, Py_ssize_t D, const int64_t *ids,
                                Py_ssize_t n, double *out) noexcept nogil
    void fs_embed_scatterf(float *dW, Py_ssize_t V, Py_ssize_t D, const int64_t *ids,
                           Py_ssize_t ids_s0, Py_ssize_t ids_s1, const float *d, Py_ssize_t d_s0,
                           Py_ssize_t d_s1, Py_ssize_t N, Py_ssize_t T) noexcept nogil
    void fs_embed_scatterd(double *dW, Py_ssize_t V, Py_ssize_t D, const int64_t *ids,
                           Py_ssize_t ids_s0, Py_ssize_t ids_s1, const double *d,
                           Py_ssize_t d_s0, Py_ssize_t d_s1, Py_ssize_t N,
                           Py_ssize_t T) noexcept nogil


cdef struct SoftmaxJob:
    Py_ssize_t nq, M, V
    void *S
    const int64_t *labels
    int64_t ignore
    bint has_ignore
    double denom
    double *loss


cdef void _softmax_task(floating *tag, void *ctx, Py_ssize_t q, int tid) noexcept nogil:
    """Rows [q M / nq, (q + 1) M / nq) of softmax_xent (fs_pool.h task)."""
    cdef SoftmaxJob *j = <SoftmaxJob *>ctx
    cdef Py_ssize_t r0 = q * j.M // j.nq, r1 = (q + 1) * j.M // j.nq
    if floating is float:
        fs_softmax_rowsf(<float *>j.S, r0, r1, j.V, j.labels, j.ignore, j.has_ignore, j.denom,
                         j.loss)
    else:
        fs_softmax_rowsd(<double *>j.S, r0, r1, j.V, j.labels, j.ignore, j.has_ignore, j.denom,
                         j.loss)


def softmax_xent(floating[:, ::1] S, const int64_t[::1] labels, int64_t ignore,
                 bint has_ignore=True, int nthreads=1):
    """Softmax cross-entropy in place (see above): S becomes the gradient of the mean loss;
    returns the mean loss. Rows go in chunks fixed by the shape (each row's bits are its own),
    on up to nthreads threads, and the rows' losses are added in row order. has_ignore=False:
    no label is ignored. A label outside [0, V) raises ValueError (nothing is written)."""
    cdef Py_ssize_t M = S.shape[0], V = S.shape[1], i, n_valid = 0
    if labels.shape[0] != M:
        raise ValueError(f"{labels.shape[0]} labels for {M} rows")
    for i in range(M):
        if has_ignore and labels[i] == ignore:
            continue
        if labels[i] < 0 or labels[i] >= V:
            raise ValueError(f"label {labels[i]} at position {i} is outside [0, {V}) "
                             f"(and is not the ignore label {ignore})")
        n_valid += 1
    if M == 0:
        return 0.0
    loss_arr = np.empty(M, dtype=np.float64)
    cdef double[::1] loss = loss_arr
    cdef SoftmaxJob job
    cdef Py_ssize_t nq = _even(min(M * V // MATMUL_CHUNK_WORK + 1, MATMUL_MAX_CHUNKS, M))
    job.nq, job.M, job.V, job.S, job.labels = nq, M, V, &S[0, 0], &labels[0]
    job.ignore, job.has_ignore, job.loss = ignore, has_ignore, &loss[0]
    job.denom = <double>n_valid if n_valid > 0 else 1.0
    cdef double total = 0
    with nogil:
        fs_pool_run(nthreads, nq, <fs_task>_softmax_task[floating], &job)
        for i in range(M):
            total += loss[i]
    return total / job.denom


def embed_gather(const floating[:, ::1] W, const int64_t[::1] ids, floating[:, ::1] out):
    """out[k] = W[ids[k]]; returns -1, or the position of the first id outside [0, V) (then
    nothing is written)."""
    cdef Py_ssize_t n = ids.shape[0], V = W.shape[0], D = W.shape[1], bad = -1
    if out.shape[0] != n or out.shape[1] != D:
        raise ValueError(f"out has shape {tuple(out.shape)[:2]}, expected {(n, D)}")
    if n == 0:
        return -1
    if V == 0:
        return 0
    with nogil:
        if floating is float:
            bad = fs_embed_gatherf(&W[0, 0], V, D, &ids[0], n, &out[0, 0] if D else NULL)
        else:
            bad = fs_embed_gatherd(&W[0, 0], V, D, &ids[0], n, &out[0, 0] if D else NULL)
    return bad


def embed_scatter(floating[:, ::1] dW, const int64_t[:, :] ids, const floating[:, :, :] d,
                  bint accumulate=False):
    """dW (+)= the rows of d (N, T, D; any strides but the last) added at ids (N, T); the ids
    must already be checked (embed_gather did)."""
    cdef Py_ssize_t N = ids.shape[0], T = ids.shape[1], D = dW.shape[1], V = dW.shape[0]
    cdef Py_ssize_t isz = sizeof(floating)
    if d.shape[0] != N or d.shape[1] != T or d.shape[2] != D:
        raise ValueError(f"gradient has shape {tuple(d.shape)[:3]}, expected {(N, T, D)}")
    if D > 1 and d.strides[2] != isz:
        raise ValueError("the gradient must be contiguous along its last axis")
    if not accumulate and V and D:
        memset(&dW[0, 0], 0, V * D * isz)
    if N == 0 or T == 0 or V == 0 or D == 0:
        return
    with nogil:
        if floating is float:
            fs_embed_scatterf(&dW[0, 0], V, D, &ids[0, 0], ids.strides[0] // 8,
                              ids.strides[1] // 8, &d[0, 0, 0], d.strides[0] // isz,
                              d.strides[1] // isz, N, T)
        else:
            fs_embed_scatterd(&dW[0, 0], V, D, &ids[0, 0], ids.strides[0] // 8,
                              ids.strides[1] // 8, &d[0, 0, 0], d.strides[0] // isz,
                              d.strides[1] // isz, N, T)
