"""Pictures of what the search did (needs matplotlib: ``pip install dac[viz]``).

Each function draws on a matplotlib ``Axes`` (a new figure when ``ax`` is None) and
returns it. Boxes are xyxy in input pixels. Axes are labelled with their units, legends
sit outside the image (``legend=False`` leaves them to the caller, e.g. one
``fig.legend`` for a grid of panels), colour bars say what their colour measures.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._checks import DACInputError
from .functional.rectangle import soft_rectangle

__all__ = ["plot_boxes", "plot_saliency", "plot_search_stages", "plot_soft_rectangles", "pyplot", "require_matplotlib"]

#: Axis labels of pictures in input pixels (xyxy boxes live there).
PIXEL_AXES = ("x (input pixels)", "y (input pixels)")


def pyplot():
    """matplotlib's ``pyplot`` on the non-interactive Agg backend (unless one is chosen).

    Raises:
        DACInputError: matplotlib is not installed (``pip install 'dac[viz]'``).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail with one line, before any work, where matplotlib (for figures) is missing.

    Raises:
        DACInputError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DACInputError("figures: needs matplotlib, which is not installed: pip install 'dac[viz]'") from None


def _axes(ax, figsize=(8, 4.5)):
    if ax is None:
        _, ax = pyplot().subplots(figsize=figsize)
    return ax


def _gray(image: torch.Tensor):
    """Tensor[C, H, W] (any dtype) -> H x W float array in [0, 1] for imshow."""
    from .functional.pooling import to_unit_range

    return to_unit_range(image.detach().cpu(), torch.float32).mean(0).clamp(0, 1).numpy()


def _image_axes(ax, labels=PIXEL_AXES, title: str | None = None) -> None:
    ax.set_xlabel(labels[0], fontsize=7)
    ax.set_ylabel(labels[1], fontsize=7)
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=9)


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, never over the image."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=7, frameon=False)


def _rect(ax, box, color, label=None, width=2.0, style="-"):
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=width, linestyle=style, label=label))


def plot_boxes(image: torch.Tensor, boxes: torch.Tensor, *, labels: Sequence[str] | None = None,
               colors: Sequence[str] = ("lime", "red", "cyan", "yellow"), ax=None, title: str | None = None,
               legend: bool = True):
    """The image with one or more boxes (Tensor[4] or Tensor[N, 4], xyxy in input pixels)
    drawn on it; with ``labels``, a legend outside the image (unless ``legend=False``)."""
    ax = _axes(ax)
    ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)
    boxes = boxes.reshape(-1, 4).detach().cpu()
    for i, box in enumerate(boxes):
        _rect(ax, box, colors[i % len(colors)], labels[i] if labels else None)
    if labels and legend:
        _legend_outside(ax)
    _image_axes(ax, title=title)
    return ax


def plot_search_stages(image: torch.Tensor, stage_boxes: torch.Tensor, *, true_box: torch.Tensor | None = None,
                       ax=None, title: str | None = None, legend: bool = True):
    """Like the paper's Fig. 6: the initial box (red), the box after each stage
    (dashed, cyan to magenta) and the final box (green); the true region (yellow, dotted).

    Args:
        stage_boxes: Tensor[S, 4], xyxy in input pixels: start, after each stage, final
            (e.g. from ``DACrop.thetas_to_boxes(info.stage_thetas[i], image.shape[-2:])``).
        legend: draw the legend, outside the image (False: leave it to the caller;
            every box carries its label).
    """
    plt = pyplot()
    ax = _axes(ax)
    ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)
    stage_boxes = stage_boxes.detach().cpu()
    n = stage_boxes.shape[0]
    _rect(ax, stage_boxes[0], "red", "initial")
    cmap = plt.get_cmap("cool")
    for s in range(1, n - 1):
        _rect(ax, stage_boxes[s], cmap(s / max(n - 2, 1)), f"stage {s}", width=1.2, style="--")
    _rect(ax, stage_boxes[-1], "lime", "final", width=2.2)
    if true_box is not None:
        _rect(ax, true_box, "yellow", "true region", width=1.5, style=":")
    if legend:
        _legend_outside(ax)
    _image_axes(ax, title=title)
    return ax


def plot_saliency(saliency: torch.Tensor, *, ax=None, title: str | None = None,
                  label: str = "max - min of the window (image scaled to [0, 1])"):
    """The max–min pooled map (paper Fig. 5), Tensor[1, h, w] or [h, w], with a labelled
    colour bar; axes in pooled pixels (pooled pixel j covers input pixels [k j, k (j + 1)))."""
    ax = _axes(ax)
    im = ax.imshow(saliency.detach().cpu().reshape(saliency.shape[-2:]).numpy(), cmap="magma")
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.025)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    _image_axes(ax, ("x (pooled pixels)", "y (pooled pixels)"), title)
    return ax


def plot_soft_rectangles(sharpness: Sequence[float] = (0.01, 0.1, 10.0), *, height: int = 80, width: int = 148,
                         centre: tuple[float, float] = (74.0, 40.0), r_total: float = 30.0, aspect: float | None = None):
    """The soft rectangle of eq. 2 for several sharpness values, as 3-D surfaces
    (paper Fig. 4: a 148 x 80 grid, centre (74, 40), r = 30). Returns the figure."""
    plt = pyplot()
    aspect = height / width if aspect is None else aspect
    fig = plt.figure(figsize=(4 * len(sharpness), 3.6))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    theta = torch.tensor([[centre[0], centre[1], 0.0]], dtype=torch.float64)
    for i, g in enumerate(sharpness):
        z = soft_rectangle(theta, height, width, r_min=r_total, aspect=aspect, sharpness=g)[0]
        ax = fig.add_subplot(1, len(sharpness), i + 1, projection="3d")
        ax.plot_surface(xs.numpy(), ys.numpy(), z.numpy(), cmap="viridis", linewidth=0, antialiased=False)
        ax.set_title(f"sharpness $\\gamma$ = {g:g}", fontsize=9)
        ax.set_zlim(0, 1)
        ax.set_xlabel("x (pixels)", fontsize=7)
        ax.set_ylabel("y (pixels)", fontsize=7)
        ax.set_zlabel("z (soft rectangle)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig
