# Small fused CPU kernels for the layers around the LSTM: each replaces a handful of NumPy calls
# (whose fixed cost, a few microseconds each, dominates at these sizes) by one pass.
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


def softmax_shift(floating[:, ::1] S, const int64_t[::1] labels, int64_t ignore,
                  bint has_ignore=True):
    """Subtract each row's maximum in place; returns picked (float64, per row) and n_valid.
    has_ignore=False: no label is ignored. A label outside [0, V) raises ValueError."""
    cdef Py_ssize_t M = S.shape[0], V = S.shape[1], i, j
    cdef floating mx
    cdef int64_t lab
    cdef Py_ssize_t n_valid = 0
    if labels.shape[0] != M:
        raise ValueError(f"{labels.shape[0]} labels for {M} rows")
    picked_arr = np.zeros(M, dtype=np.float64)
    cdef double[::1] picked = picked_arr
    cdef Py_ssize_t bad = -1
    with nogil:
        for i in range(M):
            lab = labels[i]
            if not (has_ignore and lab == ignore) and (lab < 0 or lab >= V):
                bad = i
                break
            mx = S[i, 0]
            for j in range(1, V):
                if S[i, j] > mx:
                    mx = S[i, j]
            for j in range(V):
                S[i, j] = S[i, j] - mx
            if not (has_ignore and lab == ignore):
                picked[i] = S[i, lab]
                n_valid += 1
    if bad >= 0:
        raise ValueError(f"label {labels[bad]} at position {bad} is outside [0, {V}) "
                         f"(and is not the ignore label {ignore})")
    return picked_arr, n_valid


def softmax_finish(floating[:, ::1] E, const int64_t[::1] labels, const double[::1] picked,
                   int64_t ignore, Py_ssize_t n_valid, bint has_ignore=True):
    """E = exp(shifted scores) in, the gradient of the mean loss out (see the module
    docstring); returns the mean loss. labels were checked by softmax_shift."""
    cdef Py_ssize_t M = E.shape[0], V = E.shape[1], i, j
    cdef double z, loss = 0, denom = n_valid if n_valid > 0 else 1
    cdef floating r
    cdef int64_t lab
    with nogil:
        for i in range(M):
            lab = labels[i]
            if has_ignore and lab == ignore:
                for j in range(V):
                    E[i, j] = 0
                continue
            z = 0
            for j in range(V):
                z += E[i, j]
            loss += log(z) - picked[i]
            r = <floating>(1.0 / (z * denom))
            for j in range(V):
                E[i, j] = E[i, j] * r
            E[i, lab] = E[i, lab] - <floating>(1.0 / denom)
    return loss / denom


def embed_gather(const floating[:, ::1] W, const int64_t[::1] ids, floating[:, ::1] out):
    """out[k] = W[ids[k]]; returns -1, or the position of the first id outside [0, V) (then
    nothing is written)."""
    cdef Py_ssize_t n = ids.shape[0], V = W.shape[0], D = W.shape[1], k, bad = -1
    if out.shape[0] != n or out.shape[1] != D:
        raise ValueError(f"out has shape {tuple(out.shape)[:2]}, expected {(n, D)}")
    with nogil:
        for k in range(n):
            if ids[k] < 0 or ids[k] >= V:
                bad = k
                break
        if bad < 0 and D:
            for k in range(n):
                memcpy(&out[k, 0], &W[ids[k], 0], D * sizeof(floating))
    return bad


def embed_scatter(floating[:, ::1] dW, const int64_t[:, :] ids, const floating[:, :, :] d,
                  bint accumulate=False):
    """dW (+)= the rows of d (N, T, D; any strides but the last) added at ids (N, T); the ids
    must already be checked (embed_gather did)."""
    cdef Py_ssize_t N = ids.shape[0], T = ids.shape[1], D = dW.shape[1], V = dW.shape[0]
    cdef Py_ssize_t n, t, j
    cdef int64_t k
    if d.shape[0] != N or d.shape[1] != T or d.shape[2] != D:
        raise ValueError(f"gradient has shape {tuple(d.shape)[:3]}, expected {(N, T, D)}")
    with nogil:
        if not accumulate and V and D:
            memset(&dW[0, 0], 0, V * D * sizeof(floating))
        for n in range(N):
            for t in range(T):
                k = ids[n, t]
                if k < 0 or k >= V:
                    continue  # cannot happen after embed_gather; never write out of bounds
                for j in range(D):
                    dW[k, j] += d[n, t, j]

