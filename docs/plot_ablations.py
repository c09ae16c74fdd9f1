"""
Draw the ablation study's pictures from an ablations.json (written by docs/ablations.py), into
the folder that holds it:

    pip install matplotlib                    # optional, only for this script
    python docs/plot_ablations.py             # docs/ablations.json -> docs/maxvio.png, val_bpb.png, expert_load.png
    python docs/plot_ablations.py --study /tmp/smoke/ablations.json   # -> /tmp/smoke/*.png
"""
import argparse
import json
import os
import sys
from pathlib import Path

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # main says so in one line
    plt = None

DOCS = Path(__file__).resolve().parent
SMOOTH = 10  # MaxVio is drawn as a moving average over this many steps
HEATMAPS = ("aux-free", "aux-loss", "none")


def moving_average(xs, n):
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def save(fig, path):
    """To a temporary name, then renamed: a kill leaves the previous picture, not a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def curves(study, key, step_key, ylabel, title, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    configs = list(dict.fromkeys(r["config"] for r in study["runs"]))
    for c, config in enumerate(configs):
        for r in (r for r in study["runs"] if r["config"] == config):
            ys = r["curves"][key]
            ys = moving_average(ys, SMOOTH) if key == "maxvio" else ys
            ax.plot(r["curves"][step_key], ys, color=f"C{c}", ls="-" if r["seed"] == 0 else "--", lw=1.4,
                    label=f"{config}, seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save(fig, path)


def heatmaps(study, path):
    runs = {r["config"]: r for r in study["runs"] if r["seed"] == 0}
    configs = [c for c in HEATMAPS if c in runs]
    domains = list(runs[configs[0]]["loads"])
    n_layers = len(runs[configs[0]]["loads"][domains[0]])
    share = lambda counts: [x * len(counts) / sum(counts) for x in counts]  # 1 = an even share
    top = max(max(share(c)) for r in configs for d in domains for c in runs[r]["loads"][d])
    fig, axes = plt.subplots(len(configs), n_layers, figsize=(3.6 * n_layers, 1.6 * len(configs) + 1.0),
                             squeeze=False, layout="constrained")
    for row, config in enumerate(configs):
        for layer in range(n_layers):
            ax = axes[row][layer]
            grid = [share(runs[config]["loads"][d][layer]) for d in domains]
            im = ax.imshow(grid, cmap="magma", vmin=0, vmax=top, aspect="auto")
            ax.set_yticks(range(len(domains)), domains, fontsize=8)
            ax.set_xticks(range(0, len(grid[0]), 4))
            ax.tick_params(labelsize=7)
            ax.set_title(f"{config}: MoE layer {layer + 1}", fontsize=9)
            if row == len(configs) - 1:
                ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="load / even load")
    fig.suptitle("Held-out tokens per expert and domain, seed 0 (1 = an even share; 4 = every token of the "
                 "domain picks the expert)", fontsize=9)
    save(fig, path)


def die(msg):  # train.py's one line and exit status 2, without importing torch for it
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        die(f"{message} (see python {self.prog} --help)")


def main(argv=None):
    p = Parser(prog="docs/plot_ablations.py", description="Draw the ablation study's pictures beside its numbers.")
    p.add_argument("--study", default=str(DOCS / "ablations.json"), help="the numbers, written by docs/ablations.py "
                   "(default: docs/ablations.json); the pictures go to its folder")
    a = p.parse_args(argv)
    try:
        study = json.loads(Path(a.study).read_bytes())
        steps = study["meta"]["steps"]
    except OSError as e:
        die(f"--study {a.study}: {e.strerror}; run python docs/ablations.py first, or pass its ablations.json")
    except (ValueError, KeyError, TypeError):
        die(f"--study {a.study}: not the ablations.json of docs/ablations.py; run it again to write one")
    if plt is None:
        die("docs/plot_ablations.py needs matplotlib, which requirements.txt leaves out: pip install matplotlib")
    folder = Path(a.study).parent
    curves(study, "maxvio", "step", f"MaxVio (mean over MoE layers, {SMOOTH}-step average)",
           f"Expert load imbalance per training step ({steps} steps, tiny preset)", folder / "maxvio.png")
    curves(study, "val_bpb", "val_step", "validation bits/byte",
           f"Held-out standard-library code ({steps} steps, tiny preset)", folder / "val_bpb.png")
    heatmaps(study, folder / "expert_load.png")
    print(f"wrote {folder}/maxvio.png, val_bpb.png and expert_load.png")


if __name__ == "__main__":
    main()
