"""
Draw the context-extension picture from docs/context.json (written by docs/stages.py):

    pip install matplotlib                    # optional, only for this script
    python docs/plot_context.py               # -> docs/context.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent


def main():
    study = json.loads((DOCS / "context.json").read_text())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, (name, ys) in enumerate(study["curves"].items()):
        ax.plot(study["position"], ys, color=f"C{c}", lw=1.6, marker=".", label=name)
    ax.axvline(study["trained"] - 0.5, color="gray", ls="--", lw=1)
    ax.text(study["trained"] + 8, ax.get_ylim()[1] * 0.97, f"trained length {study['trained']}", va="top",
            fontsize=8, color="gray")
    ax.set_xlabel(f"position in a {study['bytes']}-byte window (mean over {study['position'][1] - study['position'][0]:.0f} "
                  "positions)")
    ax.set_ylabel("held-out bits/byte")
    ax.set_title(f"Tiny preset trained at {study['trained']} bytes, YaRN factor {study['factor']} (§4.3): "
                 f"{study['windows']} windows of held-out standard-library code", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "context.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
