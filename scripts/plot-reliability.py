#!/usr/bin/env python3
"""Reliability diagram of the confidence evaluation (docs/confidence.md).

Reads the reports examples/eval-confidence.rs writes (target/confidence/<model>-report.json) and
draws, for each model, the test part's reliability bins of the calibrated score and of
geometric_mean: the accuracy of the answers in each tenth of confidence against their mean
confidence (a calibrated score sits on the diagonal), with each bin's size as its marker.

    python3 scripts/plot-reliability.py OUT.png REPORT.json [REPORT.json ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, reports = sys.argv[1], sys.argv[2:]
    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 5), squeeze=False)
    for ax, path in zip(axes[0], reports):
        with open(path) as f:
            r = json.load(f)
        lines = {line["name"]: line for line in r["test"]}
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
        for name, color in (("calibrated", "tab:blue"), ("geometric_mean", "tab:orange")):
            line = lines[name]
            bins = line["reliability"]
            x = [b["mean_confidence"] for b in bins]
            y = [b["accuracy"] for b in bins]
            n = [b["items"] for b in bins]
            ax.plot(x, y, color=color, marker=None, linewidth=1.2)
            ax.scatter(x, y, s=[8 + 2 * k for k in n], color=color, alpha=0.7,
                       label=f"{name}: AUROC {line['auroc']:.3f}, ECE {line['ece']:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean confidence in the bin")
        ax.set_ylabel("accuracy in the bin")
        ax.set_title(f"{r['model']}: test part")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
