"""``dac demo``: the paper's map and a learned saliency, side by side on generated phantoms.

Generates ``count`` panoramic phantoms at the paper's sizes (2836x1536 and 2860x1536,
8-bit; seeds ``seed .. seed + count - 1``), finds each one's box twice — with the
paper's ``DACrop`` (the max–min map) and with the saliency stage that ships with
``dac`` (:data:`dac.saliency.SHIPPED_STAGE`, trained on other phantoms) or another
``saliency.pt`` — and writes to ``OUT``:

* ``side_by_side.png`` — each phantom with the true dental-arch region and both boxes,
  titled with each box's IoU; one legend below the panels;
* ``crops.png`` and ``crops/*.png`` — the 200x370 crops of both, a row per phantom;
* ``saliency.png`` — the two maps the search runs on for phantom 0: the max–min pooled
  map (the paper's Fig. 5) and the learned one, each with a labelled colour bar;
* ``search_stages.png`` — like the paper's Fig. 6, the paper map's box after each stage;
* ``soft_rectangle.png`` — the soft rectangle for three sharpness values (Fig. 4);
* ``boxes.csv`` — one row per phantom and map: true and found boxes (xyxy, input
  pixels), IoU, whether every tooth is inside, the solver's flags.

Then prints both boxes per phantom, each map's mean IoU and every-tooth-inside count, and
where everything is.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from ..layer import DACrop

__all__ = ["PAPER_SIZES", "run_demo"]

#: (H, W) of the phantoms, alternating: the paper's two radiograph sizes.
PAPER_SIZES = ((1536, 2836), (1536, 2860))
#: The two boxes' colours in every figure, and the true region's.
COLOURS = {"paper": "tab:red", "learned": "tab:cyan", "true": "yellow"}


def run_demo(out_dir: str | Path, *, count: int = 6, seed: int = 0, saliency: str | Path | None = None) -> dict:
    """Run the demo (see the module doc).

    Args:
        out_dir: results folder (created).
        count: phantoms (an int >= 1).
        seed: the first phantom's seed (an int >= 0).
        saliency: a ``saliency.pt`` of ``dac fit-saliency`` for the learned row
            (default :data:`dac.saliency.SHIPPED_STAGE`).

    Returns:
        ``{"paper": {"iou": [...], "mean_iou", "all_teeth_inside": [...]}, "learned": {...},
        "paths": {...}, "seconds": {"generate", "search", "figures", "total"}}``.

    Raises:
        DACInputError: a bad argument or saliency file, naming it, before any work.
    """
    from .. import viz
    from .._checks import check_int
    from ..data import io as dio
    from ..data.phantoms import make_phantom
    from ..saliency import SHIPPED_STAGE, load_dacrop, localisation_scores

    count = check_int(count, "count", 1)
    seed = check_int(seed, "seed", 0)
    plt = viz.pyplot()
    layers = {"paper": DACrop(), "learned": load_dacrop(SHIPPED_STAGE if saliency is None else saliency)}
    names = {"paper": "paper's max-min map", "learned": "learned saliency"}
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    phantoms = [make_phantom(seed + i, *PAPER_SIZES[i % len(PAPER_SIZES)]) for i in range(count)]
    images = [p.image for p in phantoms]
    truth = torch.stack([p.roi for p in phantoms])
    generated = time.perf_counter()
    found: dict[str, dict] = {}
    with torch.no_grad():
        for key, layer in layers.items():
            crops, boxes, info = layer(images, return_boxes=True)
            scores = localisation_scores(boxes.float(), truth, [p.teeth for p in phantoms])
            found[key] = {"crops": crops, "boxes": boxes, "info": info, "iou": scores["iou"],
                          "inside": scores["all_teeth_inside"]}
    searched = time.perf_counter()

    paths: dict[str, Path] = {"boxes": out / "boxes.csv"}
    rows = []
    for i, p in enumerate(phantoms):
        for key, f in found.items():
            name = f"crops/phantom_{i:02d}_{key}.png"
            dio.write_png(out / name, f["crops"][i], bits=8)
            info = f["info"]
            rows.append({
                "index": i, "seed": p.seed, "label": p.label, "map": key, "height": p.image.shape[-2], "width": p.image.shape[-1],
                **{f"true_{k}": f"{v:.1f}" for k, v in zip(("x1", "y1", "x2", "y2"), p.roi.tolist())},
                **{k: f"{v:.1f}" for k, v in zip(("x1", "y1", "x2", "y2"), f["boxes"][i].tolist())},
                "iou": f"{f['iou'][i]:.3f}", "all_teeth_inside": bool(f["inside"][i]),
                "converged": bool(info.converged[i]), "frozen": bool(info.frozen[i]), "crop": name,
            })
    with open(paths["boxes"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    cols = 2 if count > 1 else 1
    grid_rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(grid_rows, cols, figsize=(6.2 * cols, 3.5 * grid_rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= count:
            ax.set_axis_off()
            continue
        boxes = torch.stack([truth[i], found["paper"]["boxes"][i].float(), found["learned"]["boxes"][i].float()])
        labels = ["true region", names["paper"], names["learned"]]
        viz.plot_boxes(phantoms[i].image, boxes, labels=labels, colors=(COLOURS["true"], COLOURS["paper"], COLOURS["learned"]),
                       ax=ax, legend=False, title=f"phantom {i}: IoU paper {found['paper']['iou'][i]:.2f}, "
                       f"learned {found['learned']['iou'][i]:.2f}")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.5 * grid_rows + 0.6), 1, 1))
    paths["side_by_side"] = out / "side_by_side.png"
    fig.savefig(paths["side_by_side"], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(count, 2, figsize=(7.4, 2.2 * count), squeeze=False)
    for i in range(count):
        for j, key in enumerate(("paper", "learned")):
            ax = axes[i, j]
            ax.imshow(found[key]["crops"][i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            inside = "every tooth inside" if found[key]["inside"][i] else "a tooth cut"
            ax.set_title(f"phantom {i}, {names[key]}: IoU {found[key]['iou'][i]:.2f}, {inside}", fontsize=7,
                         color=COLOURS[key] if key == "paper" else "tab:blue")
    fig.tight_layout()
    paths["crops"] = out / "crops.png"
    fig.savefig(paths["crops"], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
    with torch.no_grad():
        for ax, key in zip(axes, ("paper", "learned")):
            layer = layers[key]
            viz.plot_saliency(layer.saliency_map(phantoms[0].image[None])[0], ax=ax,
                              label="max - min of the window" if key == "paper" else "learned map (gated max - min)",
                              title=f"{names[key]} of phantom 0 (k = {layer.pool_size})")
    fig.tight_layout()
    paths["saliency"] = out / "saliency.png"
    fig.savefig(paths["saliency"], dpi=80)
    plt.close(fig)

    paper, info = layers["paper"], found["paper"]["info"]
    fig, axes = plt.subplots(grid_rows, cols, figsize=(6.2 * cols, 3.5 * grid_rows + 0.6), squeeze=False)
    for i in range(count):
        stages = paper.thetas_to_boxes(info.stage_thetas[i], phantoms[i].image.shape[-2:])
        viz.plot_search_stages(phantoms[i].image, stages, true_box=phantoms[i].roi, ax=axes.flat[i], legend=False,
                               title=f"phantom {i}, paper's map: IoU {found['paper']['iou'][i]:.2f}")
    for ax in list(axes.flat)[count:]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.5 * grid_rows + 0.6), 1, 1))
    paths["search_stages"] = out / "search_stages.png"
    fig.savefig(paths["search_stages"], dpi=80)
    plt.close(fig)

    fig = viz.plot_soft_rectangles()
    paths["soft_rectangle"] = out / "soft_rectangle.png"
    fig.savefig(paths["soft_rectangle"], dpi=70)
    plt.close(fig)
    done = time.perf_counter()

    sizes = " / ".join(f"{w}x{h}" for h, w in PAPER_SIZES)
    print(f"dac demo: {count} phantoms ({sizes}, uint8, seeds {seed}..{seed + count - 1}) cropped to "
          f"{paper.output_size[1]}x{paper.output_size[0]}, the box found on two maps")
    print(f"  {'#':>2} {'true region':>26} {'paper map box':>26} {'IoU':>5} {'learned box':>26} {'IoU':>5}")
    for i in range(count):
        true = ",".join(f"{v:.0f}" for v in truth[i].tolist())
        boxes = [",".join(f"{v:.0f}" for v in found[key]["boxes"][i].tolist()) for key in ("paper", "learned")]
        print(f"  {i:>2} {true:>26} {boxes[0]:>26} {found['paper']['iou'][i]:5.2f} {boxes[1]:>26} {found['learned']['iou'][i]:5.2f}")
    result: dict = {}
    for key in ("paper", "learned"):
        f = found[key]
        print(f"  {names[key]:20s} mean IoU {f['iou'].mean():.3f}; every tooth inside {int(f['inside'].sum())}/{count}")
        result[key] = {"iou": f["iou"].tolist(), "mean_iou": float(f["iou"].mean()), "all_teeth_inside": f["inside"].tolist()}
    print(f"  time: generate {generated - start:.1f} s, search + crop (both maps) {searched - generated:.1f} s, "
          f"figures {done - searched:.1f} s")
    for key, path in paths.items():
        print(f"  {key:15s} {path}")
    print(f"  crop files      {out / 'crops'}/")
    result["paths"] = paths
    result["seconds"] = {"generate": generated - start, "search": searched - generated, "figures": done - searched,
                         "total": done - start}
    return result
