"""Optimality: does each search find the maximum of its own cost, and is it the right box?

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/optimality.py --json optimality.json

On ``--count`` phantoms (``dac.data.phantoms.make_phantom``, seeds ``--seed`` .., height
1536, widths alternating 2836 / 2860: the paper's two sizes; the default seeds
7000-7099 are the localisation benchmark's test seeds: no default is chosen on them), the paper's
max–min map (``DACrop().saliency_map``, float32, as in use) is searched by
``DACrop(search="paper")`` and ``DACrop(search="global")`` with every other setting
at its default, and each found box is compared with

* a **brute-force one-pixel grid** of the same cost (eq. 3 at the last stage's
  sharpness, times ``saliency_scale``, float64): r = 0, 1, .., r_hi, and for each r
  every x_c from its lower bound in steps of one pooled pixel plus the upper bound
  (likewise y_c), written here from eqs. 1–3 with the separable form
  ``A = V S U^T`` (one row of V per y_c, of U per x_c; not the library's grid code).
  A search "reaches" the maximum when its f (the found box re-evaluated in float64)
  is >= (1 - ``--tolerance``) times the grid's best f (default 1e-5);
* the phantom's true region (``roi``, the tight box around every tooth): IoU, and
  whether every tooth lies inside the box (>= 99 % of each tooth's area), as in
  ``benchmarks/localisation.py`` (``dac.saliency.localisation_scores``).

Also reported per search: mean f relative to the grid's best, boxes whose found f is
*above* the grid's best (the continuous optimum lies between grid points), near ties
(``info.near_tie``), and seconds per image (``search`` alone, batches of
``--batch``, ``--threads`` threads). Maps are cached in ``--cache`` (not timed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

HEIGHT, WIDTHS = 1536, (2836, 2860)
SEARCHES = ("paper", "global")


def phantom_map(seed: int, width: int, cache: Path) -> dict:
    """The phantom's max–min map (float32), true region and teeth (cached on disk)."""
    path = cache / f"{HEIGHT}x{width}" / f"{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from dac import DACrop
    from dac.data.phantoms import make_phantom

    p = make_phantom(seed, HEIGHT, width)
    item = {"seed": seed, "width": width, "map": DACrop().saliency_map(p.image[None])[0], "roi": p.roi, "teeth": p.teeth}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(item, path)
    return item


def brute_force(saliency: torch.Tensor, r_min: float, aspect: float, gamma: float) -> tuple[float, list[float]]:
    """Best f (eq. 3) over the one-pixel grid of the feasible set, and its (x_c, y_c, r).

    Args:
        saliency: Tensor[h, w] float64, already times the saliency scale.
    """
    h, w = saliency.shape
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)
    total, n = float(saliency.sum()), float(h * w)
    r_hi = max(min(w / 2.0, h / (2.0 * aspect)) - r_min, 0.0)
    radii = [float(r) for r in range(int(math.floor(r_hi)) + 1)]
    if r_hi - radii[-1] > 1e-9:
        radii.append(r_hi)
    best, best_theta = -math.inf, [0.0, 0.0, 0.0]
    for r in radii:
        r_total = r_min + r
        x_lo, y_lo = r_total - 0.5, aspect * r_total - 0.5
        x_hi, y_hi = max(w - 0.5 - r_total, x_lo), max(h - 0.5 - aspect * r_total, y_lo)  # rounding at r_hi
        x_c = torch.cat((torch.arange(x_lo, x_hi, 1.0, dtype=torch.float64), torch.tensor([x_hi], dtype=torch.float64)))
        y_c = torch.cat((torch.arange(y_lo, y_hi, 1.0, dtype=torch.float64), torch.tensor([y_hi], dtype=torch.float64)))
        # eq. 2: z = sigma(g(x - x1)) sigma(g(x2 - x)) sigma(g(y - y1)) sigma(g(y2 - y)) = v(y) u(x)
        u = torch.sigmoid(gamma * (xs - (x_c[:, None] - r_total))) * torch.sigmoid(gamma * ((x_c[:, None] + r_total) - xs))
        half = aspect * r_total
        v = torch.sigmoid(gamma * (ys - (y_c[:, None] - half))) * torch.sigmoid(gamma * ((y_c[:, None] + half) - ys))
        inside = v @ saliency @ u.T  # sum S z, [y_c, x_c]
        z = v.sum(1)[:, None] * u.sum(1)[None, :]  # sum z
        f = (inside / z) / ((total - inside) / (n - z) + 1.0)  # eq. 3
        value, index = f.flatten().max(0)
        if float(value) > best:
            best = float(value)
            best_theta = [float(x_c[index % len(x_c)]), float(y_c[index // len(x_c)]), r]
    return best, best_theta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100, help="phantoms (default 100)")
    parser.add_argument("--seed", type=int, default=7000, help="first phantom seed (default 7000)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="relative gap to the grid's best that counts as reached")
    parser.add_argument("--batch", type=int, default=20, help="maps per search call (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--cache", default=".cache/optimality", help="folder of cached maps")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    from dac import DACrop
    from dac.functional import dac_cost, fit_r_min
    from dac.saliency import localisation_scores

    warnings.filterwarnings("ignore", message="DACrop: .* did not reach a stationary point")
    cache = Path(args.cache)
    items = [phantom_map(args.seed + i, WIDTHS[i % 2], cache) for i in range(args.count)]
    layers = {name: DACrop(search=name) for name in SEARCHES}
    ref = layers["paper"]
    gamma, aspect, scale = ref.final_sharpness, ref.aspect, ref.saliency_scale

    grid_best = []
    for it in items:
        s = it["map"][0].double() * scale
        r_min = float(fit_r_min(*s.shape, ref.r_min_fraction, aspect, s[None])[0])
        grid_best.append(brute_force(s, r_min, aspect, gamma)[0])
    grid_best_t = torch.tensor(grid_best, dtype=torch.float64)

    results = {}
    for name, layer in layers.items():
        boxes, thetas, near, seconds = [], [], [], 0.0
        for width in WIDTHS:  # one batch shape per width
            group = [it for it in items if it["width"] == width]
            for start in range(0, len(group), args.batch):
                maps = torch.stack([it["map"] for it in group[start : start + args.batch]])
                with torch.no_grad():
                    layer.search(maps[:1])  # warm-up of this shape (not timed)
                    t0 = time.perf_counter()
                    b, info = layer.search(maps)
                    seconds += time.perf_counter() - t0
                boxes.append(b)
                thetas.append(info.stage_thetas[:, -1])
                near.append(info.near_tie)
        order = [it["seed"] for width in WIDTHS for it in items if it["width"] == width]
        position = {seed: i for i, seed in enumerate(order)}
        index = torch.tensor([position[it["seed"]] for it in items])
        boxes, thetas, near = torch.cat(boxes)[index].double(), torch.cat(thetas)[index].double(), torch.cat(near)[index]
        found = []
        for it, theta in zip(items, thetas):
            s = it["map"].double()[None] * scale
            r_min = fit_r_min(s.shape[-2], s.shape[-1], ref.r_min_fraction, aspect, s)
            found.append(float(dac_cost(theta[None], s, r_min=r_min, aspect=aspect, sharpness=gamma)))
        found_t = torch.tensor(found, dtype=torch.float64)
        gap = found_t / grid_best_t - 1.0
        scores = localisation_scores(boxes, torch.stack([it["roi"] for it in items]), [it["teeth"] for it in items])
        results[name] = {
            "reached_share": float((gap >= -args.tolerance).double().mean()),
            "above_grid_share": float((gap > 0).double().mean()),
            "mean_relative_gap": float(gap.mean()),
            "worst_relative_gap": float(gap.min()),
            "iou": float(scores["iou"].mean()),
            "all_teeth_inside": float(scores["all_teeth_inside"].double().mean()),
            "tooth_coverage": float(scores["tooth_coverage"].mean()),
            "near_ties": int(near.sum()),
            "ms_per_image": 1000 * seconds / len(items),
            "f": found,
            "boxes": boxes.tolist(),
        }
    record = {
        "machine": machine(torch.device("cpu")),
        "count": args.count,
        "seeds": [args.seed, args.seed + args.count - 1],
        "height": HEIGHT,
        "widths": list(WIDTHS),
        "tolerance": args.tolerance,
        "final_sharpness": gamma,
        "grid_best_f": grid_best,
        "searches": results,
        "layers": {name: repr(layer) for name, layer in layers.items()},
    }
    print(f"### Optimality on {args.count} phantoms (seeds {args.seed}-{args.seed + args.count - 1}, 1536 x 2836/2860, paper's map)")
    print()
    print("| search | f within %.0e of the 1-px grid's best | f above it | mean f / grid - 1 | worst | IoU | every tooth inside | near ties | ms/image |" % args.tolerance)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {100 * r['reached_share']:.0f} % | {100 * r['above_grid_share']:.0f} % | {r['mean_relative_gap']:.2e} | "
            f"{r['worst_relative_gap']:.2e} | {r['iou']:.3f} | {100 * r['all_teeth_inside']:.0f} % | {r['near_ties']} | {r['ms_per_image']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
