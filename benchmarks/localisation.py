"""Localisation: how well each way of finding the box finds the dental region.

Run (from the repository root)::

    .venv/bin/python benchmarks/localisation.py --split tune --json localisation-tune.json   # choosing defaults
    .venv/bin/python benchmarks/localisation.py --split test --json localisation.json --figure localisation.png

Three disjoint sets of phantoms (``dac.data.phantoms.make_phantom``, 1536 x 2836 by default):

* training: seeds 6000.. (up to 6127: the labelled phantoms of the learned rows);
* tuning (``--split tune``, the default): seeds 5000..5099. Choose defaults (members,
  margin, stretch, shift, clip, ...) on this set only. It is the set the defaults up to
  2026-12 were chosen on (then called "held-out"), so its figures flatter them;
* test (``--split test``): seeds 7000..7099, never looked at while choosing anything.
  The README's table reports this set, with the spread over 5 training seeds
  (``--seed 0`` .. ``--seed 4``).

``--held-out N`` scores the first N phantoms of the split. Each is scored against its
true region (the tight box around every tooth) and its per-tooth boxes.

Reproducible by seed: ``--seed`` fixes each learned row's initial weights
(``dac.saliency.init_generator``), batches and augmentation (``dac.saliency.random_stream``);
nothing reads the global random state, so a row run again with the same seed, options and
``--threads`` on the same machine gives bitwise the same boxes (unless ``--time-limit``
cuts its fit short, which depends on the machine's speed and load). Rows:

* the paper's DAC (max–min map) with both gamma schedules (x2 per stage, the paper's
  text; x4, its Algorithm 1), at the paper's minimum width (2/3.5 of the image) and at
  the learned rows' minimum width;
* DAC + a :class:`dac.saliency.SaliencyNet` trained on 8, 32 and 128 labelled phantoms
  (the training seeds): a mask warm start (the gate fitted to
  the labelled regions as masks), then the box loss through the search; and, for
  comparison, the warm start alone at 32 labels (no step through the box);
* direct box regression (:class:`dac.saliency.BoxRegressor`): the same features,
  labels, warm start (of its trunk and heat map), loss, batches and steps, a CNN with a
  box head;
* what a perfect gate would give (no training): DAC on the paper's map inside the true
  region and 0 outside, with both schedules (the ceiling of the search itself).

* with ``--cv DIR ...`` (folders of ``dac cv`` on phantoms, one per seed), the rows
  trained from the task loss alone, with no box labels: ``dac`` (the paper's map, for
  reference), ``dac_e2e`` (DAC + a ``SaliencyNet`` trained through the box by the
  classifier's loss), ``dac_global``, ``dac_e2e_candidates`` and ``dac_e2e_sampled`` (the
  global search; the saliency trained to pick among its maxima) and ``stn`` (a spatial
  transformer), every fold's model scored on held-out phantoms at the size that CV trained on (``configs/quick.yaml``: 192 x 354),
  mean and standard deviation over all folds of all seeds (on the split's phantoms).

Columns: mean IoU with the true region, the ceiling (the mean IoU of the best box of the
crop's aspect and minimum width), mean share of each tooth's area inside the box, the
share of images with every tooth inside (>= 99 % of each tooth's area), and training
seconds (wall clock, ``--threads`` threads per row; rows run ``--jobs`` at a time).
Phantoms and their features are cached in ``--cache`` (not timed). The JSON also
holds per row ``target_iou``: the mean IoU of the learned rows' training target (the
best box around the region grown by ``--margin``), which caps what they can reach.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, pyplot  # noqa: E402

ROWS = (
    {"name": "DAC, paper map, gamma x2 (paper text)", "kind": "paper", "factor": 2.0, "rmin": 1 / 3.5, "stages": 4},
    {"name": "DAC, paper map, gamma x4 (Algorithm 1)", "kind": "paper", "factor": 4.0, "rmin": 1 / 3.5, "stages": 4},
    {"name": "DAC, paper map, gamma x2, min width 0.4", "kind": "paper", "factor": 2.0, "rmin": 0.2, "stages": 4},
    {"name": "DAC, paper map, gamma x4, min width 0.4", "kind": "paper", "factor": 4.0, "rmin": 0.2, "stages": 4},
    {"name": "DAC + learned saliency, 8 labels", "kind": "saliency", "labels": 8},
    {"name": "DAC + learned saliency, 32 labels", "kind": "saliency", "labels": 32},
    {"name": "DAC + learned saliency, 128 labels", "kind": "saliency", "labels": 128},
    {"name": "DAC + mask warm start only, 32 labels (no box steps)", "kind": "mask", "labels": 32},
    {"name": "box regression, 8 labels", "kind": "regression", "labels": 8},
    {"name": "box regression, 32 labels", "kind": "regression", "labels": 32},
    {"name": "box regression, 128 labels", "kind": "regression", "labels": 128},
    {"name": "DAC, paper map inside the true region only, gamma x2", "kind": "oracle", "factor": 2.0},
    {"name": "DAC, paper map inside the true region only, gamma x4", "kind": "oracle", "factor": 4.0},
)
#: First seed of each set of phantoms; the sets are disjoint (at most 1000 phantoms each).
SPLIT_SEED = {"tune": 5000, "test": 7000}
TRAIN_SEED = 6000


def phantom_item(args: tuple) -> dict:
    """One phantom's features, region and teeth (cached on disk)."""
    seed, height, width, pool, cache = args
    torch.set_num_threads(1)
    path = Path(cache) / f"{height}x{width}-k{pool}" / f"{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from dac.data.phantoms import make_phantom
    from dac.saliency import saliency_features

    p = make_phantom(seed, height, width)
    item = {"seed": seed, "features": saliency_features(p.image[None], pool)[0].half(), "roi": p.roi, "teeth": p.teeth}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(item, tmp)
    os.replace(tmp, path)
    return item


def run_row(args: tuple) -> dict:
    row, opts = args
    warnings.filterwarnings("ignore")
    torch.set_num_threads(opts["threads"])
    from dac import DACrop
    from dac.saliency import (
        BoxRegressor, SaliencyNet, aspect_box, fit_box_regressor, fit_saliency, init_generator, labelled_fit,
        localisation_scores, margin_target, minimum_width, region_masks,
    )

    height, width, k = opts["height"], opts["width"], opts["pool_size"]
    items = torch.load(opts["data"], weights_only=True)
    first = SPLIT_SEED[opts["split"]]
    test = [it for it in items if first <= it["seed"] < first + opts["held_out"]]
    train = [it for it in items if TRAIN_SEED <= it["seed"] < TRAIN_SEED + row.get("labels", 0)]
    rmin = row.get("rmin", opts["rmin"])
    factor = row.get("factor", opts["factor"])
    stages = row.get("stages", opts["stages"])
    # the initial weights from the seed alone: the same whichever rows run, in whichever order
    net = (SaliencyNet(k, width=opts["net_width"], members=opts["members"], generator=init_generator(opts["seed"]))
           if row["kind"] in ("saliency", "mask") else None)
    layer = DACrop(opts["output_size"], k, saliency=net, r_min_fraction=rmin, sharpness_factor=factor, stages=stages,
                   search=opts["search"])
    fit = dict(steps=opts["steps"], mask_steps=opts["mask_steps"], batch_size=opts["batch_size"], lr=opts["lr"], mask_lr=opts["mask_lr"],
               coverage_weight=opts["coverage_weight"], margin=opts["margin"], stretch=opts["stretch"], shift=opts["shift"],
               clip_norm=opts["clip_norm"], border=opts["border"], time_limit=opts["time_limit"], seed=opts["seed"])
    features = [it["features"].float() for it in train]
    regions = torch.stack([it["roi"] for it in train]) if train else None
    sizes = [(height, width)] * len(train)
    history = None
    if row["kind"] == "saliency":
        history = fit_saliency(net, features, regions, sizes, layer, **fit)
    elif row["kind"] == "mask":  # the same fit, stopped after its warm start
        history = fit_saliency(net, features, regions, sizes, layer, **(fit | {"steps": 0}))
    elif row["kind"] == "regression":
        model = BoxRegressor(layer.aspect, k, width=opts["net_width"], min_width_fraction=2 * rmin, generator=init_generator(opts["seed"]))
        history = fit_box_regressor(model, features, regions, sizes, layer, **fit)
    grid = (height // k * k, width // k * k)
    boxes = []
    with torch.no_grad():
        for start in range(0, len(test), 20):
            feats = torch.stack([it["features"].float() for it in test[start : start + 20]])
            if row["kind"] == "regression":
                boxes.append(model(feats, grid))
            elif row["kind"] == "oracle":  # what a perfect gate would give: the paper's map, 0 outside the region
                truth = torch.stack([it["roi"] for it in test[start : start + 20]]).double()
                boxes.append(layer.search(feats[:, :1] * region_masks(truth, feats.shape[-2:], k).float())[0])
            else:
                boxes.append(layer.search(net.from_features(feats) if net is not None else feats[:, :1])[0])
    boxes = torch.cat(boxes)
    truth = torch.stack([it["roi"] for it in test])
    scores = localisation_scores(boxes, truth, [it["teeth"] for it in test])
    ceiling = aspect_box(truth, layer.aspect, torch.tensor([grid] * len(test)), minimum_width(layer, (height, width)))
    target = margin_target(truth.double(), opts["margin"], layer, (height, width))  # what the box loss pulls towards
    result = {
        "row": row["name"] + (f", {opts['members']} members" if net is not None and opts["members"] > 1 else ""), "kind": row["kind"],
        "split": opts["split"], "search": opts["search"], "seed": opts["seed"], "labels": row.get("labels", 0), "sharpness_factor": factor, "stages": stages,
        "min_width_fraction": 2 * rmin,
        "iou": float(scores["iou"].mean()), "iou_std": float(scores["iou"].std()),
        "ceiling": float(localisation_scores(ceiling, truth)["iou"].mean()),
        "target_iou": float(localisation_scores(target, truth)["iou"].mean()),
        "tooth_coverage": float(scores["tooth_coverage"].mean()),
        "all_teeth_inside": float(scores["all_teeth_inside"].float().mean()),
        "train_s": history.seconds if history else 0.0, "steps": history.steps if history else 0,
        "mask_steps": history.mask_steps if history else 0,
        "frozen_boxes": history.frozen if history else 0, "unconverged_boxes": history.unconverged if history else 0,
        "clipped_steps": history.clipped if history else 0,
        "loss_every_10_steps": history.loss[::10] if history else [],
        "mask_loss_every_10_steps": history.mask_loss[::10] if history else [],
        "boxes": boxes.tolist(),
    }
    if net is not None and train:  # how the boxes fit the labels trained on (what fit.json reports)
        result.update(labelled_fit(net, layer, features, regions))
    if net is not None and opts.get("save"):
        from dac.saliency import save_saliency

        save_saliency(net, Path(opts["save"]) / f"saliency-{row['labels']}.pt")
    return result


def task_loss_rows(cv_dirs: list[str], count: int, split: str) -> list[dict]:
    """Localisation of the boxes the ``dac cv`` models in ``cv_dirs`` find, learned from the task loss alone."""
    import statistics

    from dac.data.phantoms import make_phantom
    from dac.saliency import localisation_scores
    from dac.train import load_config, load_pipeline

    titles = {"dac": "DAC, paper map (trained classifier only)",
              "dac_global": "DAC, paper map, global search (trained classifier only)",
              "dac_e2e": "DAC end to end: SaliencyNet from the task loss",
              "dac_e2e_candidates": "DAC end to end, candidates: SaliencyNet from the task loss, global search",
              "dac_e2e_sampled": "DAC end to end, one candidate drawn per image: SaliencyNet from the task loss, global search",
              "stn": "STN from the task loss"}
    per: dict[str, list[dict]] = {}
    for folder in cv_dirs:
        config = load_config(Path(folder) / "config.yaml")
        if config.data.source != "phantom":
            raise SystemExit(f"--cv: {folder} was not trained on phantoms (data.source {config.data.source!r})")
        height, width = config.data.sizes[0]
        test = [make_phantom(SPLIT_SEED[split] + i, height, width) for i in range(count)]
        images = torch.stack([p.image for p in test])
        truth = torch.stack([p.roi for p in test])
        summary = json.loads((Path(folder) / "summary.json").read_text())
        for name in titles:  # the pipelines with a front to score, in the table's order
            if name not in summary:
                continue
            seconds = {f["fold"]: f["train_seconds"] for f in summary[name]["folds"]}
            for fold in range(config.train.folds):
                net = load_pipeline(folder, name, fold)
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    boxes = torch.cat([net.front.locate(images[i : i + 25]) for i in range(0, count, 25)])
                scores = localisation_scores(boxes, truth, [p.teeth for p in test])
                per.setdefault(name, []).append({
                    "cv": str(folder), "fold": fold, "iou": float(scores["iou"].mean()),
                    "tooth_coverage": float(scores["tooth_coverage"].mean()),
                    "all_teeth_inside": float(scores["all_teeth_inside"].float().mean()),
                    "accuracy": next(f["accuracy"] for f in summary[name]["folds"] if f["fold"] == fold),
                    "train_s": seconds.get(fold, float("nan")), "size": [height, width],
                })
    rows = []
    for name, runs in per.items():
        row = {"row": titles[name], "kind": "task_loss", "pipeline": name, "models": len(runs), "runs": runs}
        for key in ("iou", "tooth_coverage", "all_teeth_inside", "accuracy", "train_s"):
            values = [r[key] for r in runs]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def figure(path: str, results: list[dict], opts: dict) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    from dac.data.phantoms import make_phantom

    shown = [r for r in results if r["row"] == ROWS[0]["name"] or (r["kind"] in ("saliency", "regression") and r["labels"] == 32)]
    count = opts["figure_count"]
    fig, axes = plt.subplots(count, 1, figsize=(8, 2.6 * count), constrained_layout=True)
    colours = ("tab:red", "tab:blue", "tab:orange")
    for i, ax in enumerate(axes):
        p = make_phantom(SPLIT_SEED[opts["split"]] + i, opts["height"], opts["width"])
        ax.imshow(p.image[0], cmap="gray")
        x1, y1, x2, y2 = p.roi.tolist()
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.5, ls="--", label="true region"))
        for r, colour in zip(shown, colours):
            x1, y1, x2, y2 = r["boxes"][i]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.5, label=r["row"]))
        ax.set_axis_off()
        ax.set_title(f"{opts['split']} phantom {SPLIT_SEED[opts['split']] + i}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=80)
    print(f"figure -> {path}")


def run_rows(rows: list[dict], args: argparse.Namespace, opts: dict, height: int, width: int) -> list[dict]:
    """The paper-size rows: phantoms cached, each row trained and scored (``--jobs`` at a time)."""
    labels = max([r.get("labels", 0) for r in rows] + [0])
    began = time.perf_counter()
    first = SPLIT_SEED[args.split]
    seeds = list(range(first, first + args.held_out)) + list(range(TRAIN_SEED, TRAIN_SEED + labels))
    with ProcessPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        items = list(pool.map(phantom_item, [(s, height, width, args.pool_size, args.cache) for s in seeds], chunksize=4))
    data = Path(args.cache) / f"set-{height}x{width}-k{args.pool_size}-{args.split}{args.held_out}-{labels}.pt"
    tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")  # whole or not at all: another run may be reading it
    torch.save(items, tmp)
    os.replace(tmp, data)
    print(f"{len(items)} phantoms ready in {time.perf_counter() - began:.0f} s", flush=True)
    opts.update({
        "height": height, "width": width, "pool_size": args.pool_size,
        "output_size": tuple(int(v) for v in args.output_size.lower().split("x")), "rmin": args.rmin, "factor": args.factor, "stages": args.stages,
        "steps": args.steps, "mask_steps": args.mask_steps, "time_limit": args.time_limit, "batch_size": args.batch_size, "lr": args.lr,
        "mask_lr": args.mask_lr,
        "coverage_weight": args.coverage_weight, "margin": args.margin, "stretch": args.stretch, "shift": args.shift, "clip_norm": args.clip_norm, "border": args.border, "search": args.search, "net_width": args.net_width, "members": args.members, "seed": args.seed, "threads": args.threads,
        "data": str(data), "save": args.save,
    })
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_row, [(r, opts) for r in rows]))
    print("| row | mean IoU | ceiling | tooth coverage | every tooth inside | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['row']} | {r['iou']:.3f} | {r['ceiling']:.3f} | {r['tooth_coverage']:.3f} | "
              f"{100 * r['all_teeth_inside']:.0f} % | {r['train_s']:.0f} |")
    return results


def main(argv: list[str] | None = None) -> int:
    from dac.saliency import FIT_DEFAULTS, LEARNED_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=tuple(SPLIT_SEED), default="tune",
                        help="score on the tuning phantoms (seeds 5000.., default: choose defaults here) or the test "
                        "phantoms (seeds 7000..: the reported table)")
    parser.add_argument("--held-out", type=int, default=100, help="phantoms of the split scored (default 100, at most 1000)")
    parser.add_argument("--size", default="1536x2836", help="phantom HxW (default the paper's 1536x2836)")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--output-size", default="200x370")
    parser.add_argument("--rmin", type=float, default=LEARNED_DEFAULTS["r_min_fraction"], help="learned rows' r_min_fraction (min width = 2 rmin W)")
    parser.add_argument("--factor", type=float, default=LEARNED_DEFAULTS["sharpness_factor"], help="learned rows' gamma factor per stage")
    parser.add_argument("--search", choices=("paper", "global"), default="paper", help="every row's DACrop search, training and scoring (default %(default)s; dac fit-saliency trains with global)")
    parser.add_argument("--stages", type=int, default=4, help="learned rows' stages (default 4, the paper's)")
    parser.add_argument("--steps", type=int, default=FIT_DEFAULTS["steps"], help="steps on the box loss")
    parser.add_argument("--mask-steps", type=int, default=FIT_DEFAULTS["mask_steps"], help="steps of the mask warm start (0: none)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per fit, warm start included (default 600)")
    parser.add_argument("--batch-size", type=int, default=FIT_DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=FIT_DEFAULTS["lr"], help="learning rate of the box steps")
    parser.add_argument("--mask-lr", type=float, default=FIT_DEFAULTS["mask_lr"], help="learning rate of the warm start")
    parser.add_argument("--coverage-weight", type=float, default=FIT_DEFAULTS["coverage_weight"], help="weight of teeth cut off in the box loss")
    parser.add_argument("--margin", type=float, default=FIT_DEFAULTS["margin"], help="target margin, image widths per side")
    parser.add_argument("--stretch", type=float, default=FIT_DEFAULTS["stretch"], help="augmentation: left-right stretch range (0: none)")
    parser.add_argument("--shift", type=float, default=FIT_DEFAULTS["shift"], help="augmentation: largest move, image widths (0: none)")
    parser.add_argument("--clip-norm", type=float, default=FIT_DEFAULTS["clip_norm"], help="largest gradient norm of a box step (inf: no clip)")
    parser.add_argument("--border", type=float, default=FIT_DEFAULTS["border"], help="augmentation: share of images given a collimator border beside the region")
    parser.add_argument("--net-width", type=int, default=16)
    parser.add_argument("--members", type=int, default=FIT_DEFAULTS["members"], help="gates of the learned saliency, trained side by side and averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (0-based), 'all' or 'none' (only --cv rows)")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once (processes)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per row")
    parser.add_argument("--cache", default="benchmarks/results/phantoms", help="phantom feature cache")
    parser.add_argument("--save", metavar="DIR", help="also save the learned saliency stages here")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--figure", metavar="PATH")
    parser.add_argument("--figure-count", type=int, default=3)
    parser.add_argument("--cv", nargs="+", metavar="DIR", help="dac cv folders on phantoms (one per seed): task-loss rows")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    if args.rows == "none":
        rows = []
    else:
        rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    if not 1 <= args.held_out <= 1000 or args.seed < 0:
        parser.error("--held-out: expected 1..1000 (the splits are 1000 seeds apart); --seed: expected >= 0")
    opts = {"split": args.split, "held_out": args.held_out, "figure_count": args.figure_count}
    results = run_rows(rows, args, opts, height, width) if rows else []
    task = task_loss_rows(args.cv, args.held_out, args.split) if args.cv else []
    if task:
        size = "x".join(str(v) for v in task[0]["runs"][0]["size"])
        print(f"\nLearned from the task loss alone ({args.held_out} {args.split} phantoms of {size}; mean ± std over "
              f"{task[0]['models']} models: folds x seeds)")
        print("| row | mean IoU | tooth coverage | every tooth inside | accuracy | train s / fold |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in task:
            print(f"| {r['row']} | {r['iou']:.3f} ± {r['iou_std']:.3f} | {r['tooth_coverage']:.3f} ± {r['tooth_coverage_std']:.3f} | "
                  f"{100 * r['all_teeth_inside']:.0f} ± {100 * r['all_teeth_inside_std']:.0f} % | "
                  f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} % | {r['train_s']:.0f} |")
    if args.json:
        record = {"command": " ".join(sys.argv), "options": opts, "machine": machine(torch.device("cpu")), "results": results,
                  "task_loss": task}
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.figure and results:
        figure(args.figure, results, opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
