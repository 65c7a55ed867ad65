"""Curves as PNG (matplotlib is optional: `pip install fastseq[plot]`)."""


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def plot_curves(curves, xlabel, ylabel, path, title=None, ylim=None, xs=None):
    """curves: {label: [y, ...]}; saves a PNG at path atomically. Returns path, or None without matplotlib."""
    if not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, ys in curves.items():
        x = xs if xs is not None else range(1, len(ys) + 1)
        ax.plot(list(x)[:len(ys)], ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return _save(fig, path)



def _save(fig, path):
    """Write the figure to path as a PNG with fastseq.files.atomic_write; close it."""
    import matplotlib.pyplot as plt

    from .files.core import atomic_write
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_curve(ys, xlabel, ylabel, path=None, ylim=None):
    return plot_curves({ylabel: ys}, xlabel, ylabel, path or f"{ylabel}.png", ylim=ylim)


def plot_attention_maps(maps, path, ncols=2):
    """maps: [(weights (S, T), question characters (T,), answer characters (S,)), ...]; one
    heat map per question (rows: answer symbols, columns: question characters), saved as one
    PNG at path atomically. Returns path, or None without matplotlib."""
    if not have_matplotlib() or not maps:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = (len(maps) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.2 * nrows), dpi=100,
                             squeeze=False)
    for ax, (w, q, a) in zip(axes.flat, maps):
        ax.imshow(w, cmap="gray", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(q)))
        ax.set_xticklabels([c if c != " " else "\u2423" for c in q], fontsize=7)
        ax.set_yticks(range(len(a)))
        ax.set_yticklabels([c if c != " " else "\u2423" for c in a], fontsize=7)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    return _save(fig, path)
