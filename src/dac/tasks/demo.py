"""``dac demo``: the main job on generated panoramic phantoms, with pictures.

Generates ``count`` phantoms at the paper's sizes (2836x1536 and 2860x1536, 8-bit),
crops them with the paper's ``DACrop`` and writes to ``OUT``:

* ``search_stages.png`` — like the paper's Fig. 6, one panel per phantom (all of
  them): initial box, the box after each stage and the final box, with the true
  dental-arch region; one legend, below the panels;
* ``saliency.png`` — the max–min pooled map (Fig. 5) of phantom 0, with a labelled
  colour bar;
* ``soft_rectangle.png`` — the soft rectangle for three sharpness values (Fig. 4);
* ``crops.png`` and ``crops/*.png`` — the 200x370 crops, all of them;
* ``boxes.csv`` — true and found boxes (xyxy, input pixels), IoU, solver flags.

Then prints where everything is and the mean IoU.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

from .layer import DACrop

__all__ = ["run_demo"]

PAPER_SIZES = ((1536, 2836), (1536, 2860))


def run_demo(out_dir: str | Path, *, count: int = 6, seed: int = 0) -> dict:
    """Run the demo (see module doc); returns ``{"mean_iou", "iou", "paths", "seconds"}``."""
    from .data import io as dio
    from . import viz
    from .data.phantoms import make_phantom
    from .functional import max_min_pool

    plt = viz.pyplot()
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phantoms = [make_phantom(seed + i, *PAPER_SIZES[i % len(PAPER_SIZES)]) for i in range(count)]
    generated = time.perf_counter()
    layer = DACrop()
    with torch.no_grad():
        crops, boxes, info = layer([p.image for p in phantoms], return_boxes=True)
    searched = time.perf_counter()
    truth = torch.stack([p.roi for p in phantoms]).to(boxes.dtype)
    iou = box_iou(boxes, truth).diagonal()

    paths = {}
    rows = []
    for i, p in enumerate(phantoms):
        name = f"crops/phantom_{i:02d}_class{p.label}.png"
        dio.write_png(out / name, crops[i], bits=8)
        rows.append({
            "index": i, "seed": p.seed, "label": p.label, "restorations": p.restorations,
            "height": p.image.shape[-2], "width": p.image.shape[-1],
            **{f"true_{k}": f"{v:.1f}" for k, v in zip(("x1", "y1", "x2", "y2"), p.roi.tolist())},
            **{k: f"{v:.1f}" for k, v in zip(("x1", "y1", "x2", "y2"), boxes[i].tolist())},
            "iou": f"{iou[i]:.3f}", "converged": bool(info.converged[i]), "frozen": bool(info.frozen[i]),
            "held": " ".join(str(v) for v in info.held[i].tolist()), "iterations": int(info.iterations[i]),
            "crop": name,
        })
    paths["boxes"] = out / "boxes.csv"
    with open(paths["boxes"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    cols = 2 if count > 1 else 1
    rows_ = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(6.2 * cols, 3.5 * rows_ + 0.6), squeeze=False)
    for i in range(count):
        stages = layer.thetas_to_boxes(info.stage_thetas[i], phantoms[i].image.shape[-2:])
        viz.plot_search_stages(phantoms[i].image, stages, true_box=phantoms[i].roi, ax=axes.flat[i], legend=False,
                               title=f"phantom {i} (class {phantoms[i].label}): IoU {iou[i]:.2f}")
    for ax in list(axes.flat)[count:]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.5 * rows_ + 0.6), 1, 1))
    paths["search_stages"] = out / "search_stages.png"
    fig.savefig(paths["search_stages"], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    viz.plot_saliency(max_min_pool(phantoms[0].image[None], layer.pool_size)[0], ax=ax,
                      title=f"max-min pooled map (k = {layer.pool_size}) of phantom 0")
    fig.tight_layout()
    paths["saliency"] = out / "saliency.png"
    fig.savefig(paths["saliency"], dpi=80)
    plt.close(fig)

    fig = viz.plot_soft_rectangles()
    paths["soft_rectangle"] = out / "soft_rectangle.png"
    fig.savefig(paths["soft_rectangle"], dpi=70)
    plt.close(fig)

    cols = 3
    fig, axes = plt.subplots((count + cols - 1) // cols, cols, figsize=(3.7 * cols, 2.3 * ((count + cols - 1) // cols)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < count:
            ax.imshow(crops[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"crop {i}, class {phantoms[i].label}", fontsize=8)
    fig.tight_layout()
    paths["crops"] = out / "crops.png"
    fig.savefig(paths["crops"], dpi=80)
    plt.close(fig)
    done = time.perf_counter()

    sizes = " / ".join(f"{w}x{h}" for h, w in PAPER_SIZES)
    print(f"dac demo: {count} phantoms ({sizes}, uint8) cropped to {layer.output_size[1]}x{layer.output_size[0]} by DACrop")
    print(f"  {'#':>2} {'class':>5} {'true region':>26} {'box found':>26} {'IoU':>5}")
    for r in rows:
        true = ",".join(r[f"true_{k}"] for k in ("x1", "y1", "x2", "y2"))
        found = ",".join(r[k] for k in ("x1", "y1", "x2", "y2"))
        print(f"  {r['index']:>2} {r['label']:>5} {true:>26} {found:>26} {r['iou']:>5}")
    print(f"  mean IoU {iou.mean():.3f}; converged {int(info.converged.sum())}/{count}")
    print(f"  time: generate {generated - start:.1f} s, search + crop {searched - generated:.1f} s, figures {done - searched:.1f} s")
    for key, path in paths.items():
        print(f"  {key:15s} {path}")
    print(f"  crops           {out / 'crops'}/")
    return {"mean_iou": float(iou.mean()), "iou": iou.tolist(), "paths": paths, "seconds": done - start}
