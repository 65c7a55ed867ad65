"""fastseq's compiled CPU kernels (_cpu). Importing scipy_openblas32 first loads the BLAS they
call (OpenBLAS as NumPy and SciPy build with it) into the process's global namespace."""
import scipy_openblas32  # noqa: F401  (loaded for _cpu's BLAS symbols)
