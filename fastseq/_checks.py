"""Argument checks shared by models, optimisers and trainers: one ValueError that names the
argument (a bool is neither a count nor a number)."""
import math
import numbers


def check_count(name, value, minimum=1):
    """value as an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name, value, optional=False):
    """value as a finite float > 0 (None stays None when ``optional``)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{' or None' if optional else ''}, "
                         f"got {value!r}")
    return float(value)


def check_fraction(name, value):
    """value as a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)
