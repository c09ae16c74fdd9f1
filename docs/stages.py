"""
The report's later stages, measured on the default checkpoint (`python train.py`: the tiny preset,
900 steps at 256 bytes): long-context extension with YaRN (§4.3) and SFT with sample masking
(§5.1), each a train.py run from that checkpoint (README, "Later stages").

    python docs/stages.py --base out       # the three runs below, then the measurements
    python docs/plot_context.py            # docs/context.png (needs matplotlib)

Runs (a finished run is skipped; each run's wall time goes to its folder's wall.json):
    long        train.py --init-from BASE --rope-factor 4 --seq-len 1024 --batch-size 4 --max-steps STEPS
    sft         train.py --init-from BASE --sft sft.jsonl (from train.py --make-sft; 2 epochs)
    sft-nomask  the same with --no-sample-mask (the packed samples see each other)

Measurements:
    context     bits per byte at each position 0..1023 of 1,025-byte windows cut from the held-out
                standard-library files (no document boundary inside a window), for the base model
                with plain RoPE, the base model with YaRN (factor 4 over 256) and no training, and
                the long run -> docs/context.json
    SFT         bits per response byte (and nats for the end token) on the held-out pairs
                (sft.val.jsonl, functions of the files pre-training never saw), each pair alone,
                and packed without a mask; one greedy completion -> docs/sft.json
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import Transformer  # noqa: E402
from train import EOT, decode, load_documents, pack_samples, read_sft  # noqa: E402

FACTOR, TRAINED, LONG = 4, 256, 1024
BUCKET = 32  # positions averaged per point of the curves


def run(name, out, flags, threads):
    """train.py into out unless it finished there; -> the wall time in seconds of the run."""
    wall = out / "wall.json"
    if wall.exists():
        return json.loads(wall.read_text())["seconds"]
    print(f"== {name}: train.py {' '.join(flags)}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "train.py", *flags, "--out", str(out), "--overwrite"], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall.write_text(json.dumps(dict(seconds=time.time() - t0, flags=flags)))
    return time.time() - t0


def yarn_untrained(base):
    """The base model with YaRN factor 4 over its 256 trained positions, weights as they are."""
    model = Transformer.from_pretrained(base)
    args = replace(model.args, rope_factor=FACTOR, original_seq_len=TRAINED, max_seq_len=max(LONG, model.args.max_seq_len))
    yarn = Transformer(args)
    yarn.load_state_dict(model.state_dict())
    return yarn.eval()


@torch.no_grad()
def loss_by_position(model, windows, batch=8):
    """windows (N, LONG + 1) -> mean next-byte loss in bits at each of the LONG positions."""
    total = torch.zeros(LONG, dtype=torch.float64)
    for w in windows.split(batch):
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none").double().sum(0)
    return (total / len(windows) / torch.log(torch.tensor(2.0))).tolist()


@torch.no_grad()
def response_loss(model, samples, mask=True):
    """Held-out pairs -> (bits per response byte, nats for the end token): each pair alone
    (segment ids), or packed into rows of 256 without a mask as pre-training packs documents."""
    x, y, seg = (t.long() for t in pack_samples(samples, TRAINED))
    logits = model(x, segment_ids=seg if mask else None).float()
    nll = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")
    byte, end = (y >= 0) & (y < 256), y == EOT
    return float(nll[byte].mean() / torch.log(torch.tensor(2.0))), float(nll[end].mean())


@torch.no_grad()
def complete(model, ids, n_prompt):
    """Greedy response to the prompt of sample ids, up to its end token (at most 200 bytes)."""
    out = model.generate(ids[None, :n_prompt + 1].long(), 200, temperature=0.0, stop_tokens=(EOT,))
    return decode(out[0, n_prompt + 1:].tolist()).split("<|endoftext|>")[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(ROOT / "out"), help="the default checkpoint (default: out)")
    p.add_argument("--out", default=str(ROOT / "out" / "stages"), help="folder of the runs (default: out/stages)")
    p.add_argument("--steps", type=int, default=200, help="steps of the long-context run (default: 200)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sft_file = out / "sft.jsonl"
    if not (out / "sft.val.jsonl").exists():
        subprocess.run([sys.executable, "train.py", "--make-sft", str(sft_file)], cwd=ROOT, check=True)
    common = ["--init-from", a.base]
    walls = dict(
        long=run("long", out / "long", [*common, "--rope-factor", str(FACTOR), "--seq-len", str(LONG),
                                        "--batch-size", "4", "--max-steps", str(a.steps), "--eval-interval",
                                        str(a.steps // 4), "--save-interval", str(a.steps), "--sample-bytes", "0"],
                 a.threads),
        sft=run("sft", out / "sft", [*common, "--sft", str(sft_file)], a.threads),
        sft_nomask=run("sft-nomask", out / "sft-nomask", [*common, "--sft", str(sft_file), "--no-sample-mask"],
                       a.threads))

    # context: loss against position
    _, val_docs = load_documents(None)
    windows = torch.cat([d[:len(d) // (LONG + 1) * (LONG + 1)].long().view(-1, LONG + 1) for d in val_docs])
    models = {"base, plain RoPE": Transformer.from_pretrained(a.base), "base + YaRN, not trained": yarn_untrained(a.base),
              f"after {a.steps} steps at {LONG}": Transformer.from_pretrained(out / "long")}
    curves = {}
    for name, model in models.items():
        t0 = time.time()
        curves[name] = loss_by_position(model, windows)
        spans = {f"{lo}-{hi - 1}": sum(curves[name][lo:hi]) / (hi - lo) for lo, hi in ((0, 256), (256, 512), (512, 1024))}
        print(f"{name}: bits/byte " + ", ".join(f"{k} {v:.3f}" for k, v in spans.items())
              + f" ({time.time() - t0:.0f} s)", flush=True)
    buckets = [(lo, lo + BUCKET) for lo in range(0, LONG, BUCKET)]
    (ROOT / "docs" / "context.json").write_text(json.dumps(dict(
        windows=len(windows), bytes=LONG, trained=TRAINED, factor=FACTOR, steps=a.steps, wall_s=walls["long"],
        position=[(lo + hi - 1) / 2 for lo, hi in buckets],
        curves={k: [sum(v[lo:hi]) / (hi - lo) for lo, hi in buckets] for k, v in curves.items()},
        spans={k: {f"{lo}-{hi - 1}": sum(v[lo:hi]) / (hi - lo) for lo, hi in ((0, 256), (256, 512), (512, 1024))}
               for k, v in curves.items()}), indent=1))

    # SFT: response loss on held-out pairs, alone and packed without a mask; one completion
    val = read_sft(str(out / "sft.val.jsonl"), TRAINED, "--sft-val")
    models = {"base": Transformer.from_pretrained(a.base), "SFT": Transformer.from_pretrained(out / "sft"),
              "SFT, no sample mask": Transformer.from_pretrained(out / "sft-nomask")}
    table = {}
    for name, model in models.items():
        table[name] = dict(alone=response_loss(model, val), packed_no_mask=response_loss(model, val, mask=False))
        print(f"{name}: " + ", ".join(f"{k} {v[0]:.3f} bits/response byte, end token {v[1]:.3f} nats"
                                      for k, v in table[name].items()), flush=True)
    ids, n = next((ids, n) for ids, n in val if decode(ids[n + 1:].tolist()).count("\n") >= 3)
    sample = dict(prompt=decode(ids[1:n + 1].tolist()), reference=decode(ids[n + 1:-1].tolist()),
                  **{name: complete(model, ids, n) for name, model in models.items()})
    (ROOT / "docs" / "sft.json").write_text(json.dumps(dict(
        pairs=len(val), wall_s={k: walls[k] for k in ("sft", "sft_nomask")}, loss=table, sample=sample), indent=1))
    for k, v in sample.items():
        print(f"--- {k}\n{v}")


if __name__ == "__main__":
    main()
