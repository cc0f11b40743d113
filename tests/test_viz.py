"""dac.viz and the demo's figures: legends outside the image, labelled axes and colour bars."""
from __future__ import annotations

import pytest
import torch

plt = pytest.importorskip("matplotlib.pyplot")

from dac import viz  # noqa: E402


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_search_stage_legend_is_outside_the_image():
    image = torch.rand(1, 60, 110)
    stages = torch.tensor([[10.0, 10, 100, 50], [15, 12, 95, 48], [20, 14, 90, 46], [22, 15, 88, 45]])
    ax = viz.plot_search_stages(image, stages, true_box=torch.tensor([20.0, 15, 90, 45]))
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    legend = ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()][0] == "initial"
    assert not overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
    assert ax.get_xlabel() == "x (input pixels)" and ax.get_ylabel() == "y (input pixels)"
    assert viz.plot_search_stages(image, stages, legend=False).get_legend() is None


def test_boxes_legend_outside_and_axes_labelled():
    ax = viz.plot_boxes(torch.rand(1, 40, 60), torch.tensor([[1.0, 2, 30, 20], [5, 5, 50, 30]]), labels=["a", "b"])
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    assert not overlaps(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
    assert ax.get_xlabel() and ax.get_ylabel()


def test_saliency_colour_bar_and_axes_are_labelled():
    ax = viz.plot_saliency(torch.rand(1, 20, 30))
    bars = [a for a in ax.figure.axes if a is not ax]
    assert len(bars) == 1 and "max - min" in bars[0].get_ylabel()
    assert ax.get_xlabel() == "x (pooled pixels)" and ax.get_ylabel() == "y (pooled pixels)"


def test_soft_rectangle_axes_are_labelled():
    fig = viz.plot_soft_rectangles(height=20, width=37, centre=(18.0, 10.0), r_total=8.0)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert ax.get_xlabel() == "x (pixels)" and ax.get_ylabel() == "y (pixels)"
        assert ax.get_zlabel() == "z (soft rectangle)"
