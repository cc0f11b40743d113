"""Cost of DACrop inside training: one optimizer step of a ResNet with and without it.

Run (from the repository root)::

    .venv/bin/python benchmarks/train_step.py --json train_step.json
    .venv/bin/python benchmarks/train_step.py --arch resnet101 --device cuda

One seeded batch of uint8 radiograph-like images (``--batch`` x 1 x ``--height`` x
``--width``; default 24 x 1 x 1536 x 2836, the paper's batch and image size) and
random labels (5 classes) go through the pipelines below, each a full training step
(forward, cross-entropy, backward, Adam step) of the same torchvision ResNet with a
1-channel stem and 5 outputs, fed 200 x 370 inputs:

* ``resize``: the whole image resized to 200 x 370 (``F.interpolate``, bilinear,
  anti-aliased; aspect distorted): the plain baseline at the same network input size.
* ``dac``: ``DACrop(output_size=(200, 370))`` in front (the layer's forward; nothing
  upstream is trainable, so no gradient flows into it).
* ``dac_e2e``: ``DACrop(saliency=SaliencyNet(10))``, the ``dac_e2e`` pipeline's front:
  the box is searched on a learned map, so the loss is differentiated through the
  implicit box gradient into the saliency net.
* ``dac_e2e_soft``: the same through the soft-edged crop of training
  (:class:`dac.train.DACFront` with ``edge_margin=--edge-margin``: the classifier sees
  (200 + 2m) x (370 + 2m)), the cost of the gradient that sees past the box's edges.
* ``dac_e2e_candidates``: the ``dac_e2e`` front with ``candidates=--candidates`` (the
  global search's maxima, each cropped; the output is their mixture weighted by
  ``f ** 8``, :class:`dac.train.Pipeline`): the classifier sees K crops per image.
* ``dac_e2e_sampled``: the same candidates, one drawn per image by its weight
  (``candidate_sampling``; the loss is :meth:`dac.train.Pipeline.training_loss`, the
  weights' gradient a score-function term): the classifier sees one crop per image.
  ``dac_e2e_sampled_best``: its baseline the loss of the image's best candidate
  (``candidate_baseline="best"``: one more classifier forward per image, no backward).

``--pipelines`` picks rows (resize and dac always run). Reported per pipeline: median
and min seconds per step over ``--repeats`` (after one warm-up), and ``dac_over_resize``
/ ``dac_e2e_over_resize`` = step time ratios (goal: the layer adds under 30%, i.e. ratio
< 1.3), and ``<pipeline>_over_dac`` for every other row (goal for the end-to-end rows:
training through the box costs at most 1.5x plain DAC). The candidates' rows run through
a :class:`dac.train.Pipeline`, which also standardises each crop (a few % of the
classifier's step). Clocks are read after ``torch.cuda.synchronize()`` on CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from _common import machine, time_it
from dac import DACrop
from dac.saliency import SaliencyNet
from dac.train import DACFront, Pipeline

OUTPUT_SIZE = (200, 370)
PIPELINES = ("resize", "dac", "dac_e2e", "dac_e2e_soft", "dac_e2e_candidates", "dac_e2e_sampled", "dac_e2e_sampled_best")


def make_batch(batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 Tensor[B, 1, H, W] (noise with one bright textured region) and labels Tensor[B]."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (batch, 1, height, width), dtype=torch.uint8, generator=gen)
    rh, rw = int(0.5 * height), int(0.6 * width)
    for b in range(batch):
        y0 = int(torch.randint(0, height - rh, (1,), generator=gen))
        x0 = int(torch.randint(0, width - rw, (1,), generator=gen))
        images[b, 0, y0 : y0 + rh, x0 : x0 + rw] = torch.randint(80, 220, (rh, rw), dtype=torch.uint8, generator=gen)
    return images, torch.randint(0, 5, (batch,), generator=gen)


def resnet(arch: str) -> nn.Module:
    """torchvision ResNet, 1 input channel, 5 classes, random init (paper §3.3)."""
    model = getattr(torchvision.models, arch)(weights=None, num_classes=5)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class Crops(nn.Module):
    """A training front's crops (a :class:`dac.train.DACFront` returns a FrontOutput)."""

    def __init__(self, front: nn.Module) -> None:
        super().__init__()
        self.front = front

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.front(images).crops


class Resize(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if not images.dtype.is_floating_point else images
        return F.interpolate(x, size=OUTPUT_SIZE, mode="bilinear", antialias=True, align_corners=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "resnet101"])
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=2836)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edge-margin", type=int, default=8, help="dac_e2e_soft's band, output pixels (default %(default)s)")
    parser.add_argument("--candidates", type=int, default=4, help="dac_e2e_candidates' K (default %(default)s)")
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help="comma-separated rows to run; resize and dac always run (the ratios' references)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    chosen = {"resize", "dac", *(n.strip() for n in args.pipelines.split(",") if n.strip())}
    unknown = chosen - set(PIPELINES)
    if unknown:
        parser.error(f"--pipelines: unknown {sorted(unknown)}; choose from {', '.join(PIPELINES)}")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    images, labels = make_batch(args.batch, args.height, args.width, args.seed)
    images, labels = images.to(device), labels.to(device)

    soft = Crops(DACFront(OUTPUT_SIZE, 10, saliency=SaliencyNet(10), edge_margin=args.edge_margin))
    pipelines = {"resize": Resize(), "dac": DACrop(output_size=OUTPUT_SIZE), "dac_e2e": DACrop(output_size=OUTPUT_SIZE, saliency=SaliencyNet(10)),
                 "dac_e2e_soft": soft, "dac_e2e_candidates": None, "dac_e2e_sampled": None, "dac_e2e_sampled_best": None}
    record: dict = {
        "machine": machine(device),
        "arch": args.arch,
        "batch": args.batch,
        "image_size": [args.height, args.width],
        "output_size": list(OUTPUT_SIZE),
        "repeats": args.repeats,
        "edge_margin": args.edge_margin,
        "pipelines": {},
    }
    for name, front in pipelines.items():
        if name not in chosen:
            continue
        torch.manual_seed(args.seed)
        candidates = name.startswith(("dac_e2e_candidates", "dac_e2e_sampled"))
        if candidates:  # K candidate crops, their mixture (or one drawn per image): the Pipeline's own loss
            front = DACFront(OUTPUT_SIZE, 10, saliency=SaliencyNet(10), search="global", candidates=args.candidates,
                             candidate_power=8.0, candidate_sampling=name.startswith("dac_e2e_sampled"),
                             candidate_baseline="best" if name == "dac_e2e_sampled_best" else "batch")
            model = Pipeline(front, resnet(args.arch), augment=None).to(device)
        else:
            model = nn.Sequential(front, resnet(args.arch)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            if candidates:
                logits, out = model(images, return_front=True)
                loss = model.training_loss(logits, labels, out) / len(labels)
            else:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        def front_only() -> None:  # the layer alone: forward, and backward where it has parameters
            out = front(images)
            if candidates:  # a FrontOutput: its parameters reach the loss through the weights, not the crops
                out = out.log_weights if out.log_weights is not None else out.sample_log_weight
            if any(p.requires_grad for p in front.parameters()):
                out.square().mean().backward()

        times, _ = time_it(step, args.repeats, device)
        front_times, _ = time_it(front_only, args.repeats, device)
        record["pipelines"][name] = {
            "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "front_median_s": statistics.median(front_times), "front_times_s": front_times,
        }
        print(f"{name:8s} median {statistics.median(times):7.3f} s/step  min {min(times):7.3f}  "
              f"front alone {statistics.median(front_times):7.3f} s", flush=True)

    runs = record["pipelines"]
    base, dac = runs["resize"]["median_s"], runs["dac"]["median_s"]
    record["dac_over_resize"] = dac / base
    for name in runs:
        if name not in ("resize", "dac"):
            record[f"{name}_over_dac"] = runs[name]["median_s"] / dac
    if "dac_e2e" in runs:
        record["dac_e2e_over_resize"] = runs["dac_e2e"]["median_s"] / base
        record["dac_e2e_front_over_dac_front"] = runs["dac_e2e"]["front_median_s"] / runs["dac"]["front_median_s"]
    print()
    print(f"| pipeline ({args.arch}, batch {args.batch}, {args.height}x{args.width} uint8) | s/step (median) | s/step (min) | / resize | front alone s |")
    print("|---|---:|---:|---:|---:|")
    for name, rec in runs.items():
        print(f"| {name} | {rec['median_s']:.3f} | {rec['min_s']:.3f} | {rec['median_s'] / base:.2f} | {rec['front_median_s']:.3f} |")
    if "dac_e2e" in runs:
        print(f"dac_e2e / dac: step {record['dac_e2e_over_dac']:.2f}, front alone (forward + backward / forward) "
              f"{record['dac_e2e_front_over_dac_front']:.2f}")
    if "dac_e2e_soft" in runs:
        print(f"dac_e2e_soft / dac (edge margin {args.edge_margin}): step {record['dac_e2e_soft_over_dac']:.2f}")
    if "dac_e2e_candidates" in runs:
        print(f"dac_e2e_candidates / dac ({args.candidates} candidates): step {record['dac_e2e_candidates_over_dac']:.2f}")
    for name in ("dac_e2e_sampled", "dac_e2e_sampled_best"):
        if name in runs:
            print(f"{name} / dac ({args.candidates} candidates, one drawn per image): step {record[name + '_over_dac']:.2f}")
    verdict = "reached" if record["dac_over_resize"] < 1.3 else "not reached"
    print(f"\ngoal: DACrop adds < 30% to the step: {verdict} (dac / resize = {record['dac_over_resize']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
