# Small fused CPU kernels for the layers around the LSTM: each replaces a handful of NumPy calls
# (whose fixed cost, a few microseconds each, dominates at these sizes) by one pass (C in
# fs_ops.h).
#
# NumPy equivalents (see fastseq.functions.softmax_cross_entropy and fastseq.layers.TimeEmbedding,
# which fall back to them):
#     softmax_shift(S, labels, ignore) -> (picked, n_valid):
#         S -= S.max(1)[:, None];  picked[i] = S[i, labels[i]] (0 on ignored rows)
#     softmax_finish(E, labels, picked, ignore, n_valid) -> loss, where E = exp(shifted S):
#         z = E.sum(1);  loss = sum over valid rows of (log(z) - picked) / n_valid
#         E[...] = E / z / n_valid, minus 1 / n_valid at each label; 0 on ignored rows
#     embed_gather(W, ids, out) -> -1:              out[...] = W[ids]   (or the flat position of
#                                                   the first id outside [0, V), nothing written)
#     embed_scatter(dW, ids, d, accumulate):        dW[...] = 0 unless accumulate;
#                                                   np.add.at(dW, ids.ravel(), d.reshape(-1, D))


cdef extern from "fs_ops.h":
    Py_ssize_t fs_softmax_shiftf(float *S, Py_ssize_t M, Py_ssize_t V, const int64_t *labels,
                                 int64_t ignore, int has_ignore, double *picked) noexcept nogil
    Py_ssize_t fs_softmax_shiftd(double *S, Py_ssize_t M, Py_ssize_t V, const int64_t *labels,
                                 int64_t ignore, int has_ignore, double *picked) noexcept nogil
    double fs_softmax_finishf(float *E, Py_ssize_t M, Py_ssize_t V, const int64_t *labels,
                              const double *picked, int64_t ignore, int has_ignore,
                              Py_ssize_t n_valid) noexcept nogil
    double fs_softmax_finishd(double *E, Py_ssize_t M, Py_ssize_t V, const int64_t *labels,
                              const double *picked, int64_t ignore, int has_ignore,
                              Py_ssize_t n_valid) noexcept nogil
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


def softmax_shift(floating[:, ::1] S, const int64_t[::1] labels, int64_t ignore,
                  bint has_ignore=True):
    """Subtract each row's maximum in place; returns picked (float64, per row) and n_valid.
    has_ignore=False: no label is ignored. A label outside [0, V) raises ValueError."""
    cdef Py_ssize_t M = S.shape[0], V = S.shape[1], n_valid = 0
    if labels.shape[0] != M:
        raise ValueError(f"{labels.shape[0]} labels for {M} rows")
    picked_arr = np.zeros(M, dtype=np.float64)
    cdef double[::1] picked = picked_arr
    if M == 0:
        return picked_arr, 0
    with nogil:
        if floating is float:
            n_valid = fs_softmax_shiftf(&S[0, 0], M, V, &labels[0], ignore, has_ignore,
                                        &picked[0])
        else:
            n_valid = fs_softmax_shiftd(&S[0, 0], M, V, &labels[0], ignore, has_ignore,
                                        &picked[0])
    if n_valid < 0:
        bad = -n_valid - 1
        raise ValueError(f"label {labels[bad]} at position {bad} is outside [0, {V}) "
                         f"(and is not the ignore label {ignore})")
    return picked_arr, n_valid


def softmax_finish(floating[:, ::1] E, const int64_t[::1] labels, const double[::1] picked,
                   int64_t ignore, Py_ssize_t n_valid, bint has_ignore=True):
    """E = exp(shifted scores) in, the gradient of the mean loss out (see above); returns the
    mean loss. labels were checked by softmax_shift."""
    cdef Py_ssize_t M = E.shape[0], V = E.shape[1]
    cdef double loss
    if labels.shape[0] != M or picked.shape[0] != M:
        raise ValueError(f"{labels.shape[0]} labels and {picked.shape[0]} picked for {M} rows")
    if M == 0:
        return 0.0
    with nogil:
        if floating is float:
            loss = fs_softmax_finishf(&E[0, 0], M, V, &labels[0], &picked[0], ignore,
                                      has_ignore, n_valid)
        else:
            loss = fs_softmax_finishd(&E[0, 0], M, V, &labels[0], &picked[0], ignore,
                                      has_ignore, n_valid)
    return loss


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
