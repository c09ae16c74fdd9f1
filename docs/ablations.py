"""
The report's ablations in miniature (DeepSeek-V3 §4.5): every balancing mode of train.py's
--balance, and multi-token prediction off (--mtp 0), two seeds each, on the tiny preset.

    python docs/ablations.py --publish       # ~35 min on 2 busy CPU cores; finished runs are skipped
    python docs/plot_ablations.py            # the pictures (needs matplotlib)
    python docs/ablations.py --steps 4 --out /tmp/smoke   # a smoke run: its results stay in /tmp/smoke

Each run trains with train.py into <--out>/<config>-s<seed>/ (default out/ablations; a killed
or preempted run continues from its last checkpoint, a folder holding a run of other flags, e.g.
another --steps, is refused), then routes held-out text of three domains through the trained
model and counts each expert's share of the tokens per MoE layer and domain. The table goes to
<--out>/ablations.md, the numbers behind it and the pictures to <--out>/ablations.json; --publish
also writes them to docs/, the study the README shows.

Specialisation: per layer, the total variation distance 1/2 sum_i |p_d(i) - p_d'(i)| between
the expert-load distributions p_d of two domains, averaged over the pairs of domains and then
over the layers: 0 when every domain uses the experts alike, 1 when no two share an expert.
"within" is the same measure between two halves of each domain's own text: the level that
differences in content alone, not in domain, reach.
"""
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train as train_py  # noqa: E402
from model import MoE, Transformer, atomic_write  # noqa: E402
from train import (NOT_SAVED, STDLIB_SKIP, Parser, die, guard_streams, interruption, load_documents,  # noqa: E402
                   positive_int, read_checkpoint, tell, thread_count, val_batches)

CONFIGS = {  # name -> train.py flags; the paper's default first
    "aux-free": [],
    "aux-loss": ["--balance", "aux-loss"],
    "batch-aux": ["--balance", "batch-aux"],
    "none": ["--balance", "none"],
    "aux-free, no MTP": ["--mtp", "0"],
}
SEEDS = (0, 1)
LATE = 0.25  # MaxVio is averaged over this last share of the steps
DOMAIN_ROWS, SEQ_LEN = 64, 256  # per domain: 64 sequences of 256 bytes, 16K tokens


def run_name(config, seed):
    return f"{config.replace(', ', '-').replace(' ', '-')}-s{seed}"


def train_flags(config, seed, out, steps, batch_size):
    return ["--preset", "tiny", "--device", "cpu", "--seq-len", "256",
            "--max-steps", str(steps), "--eval-interval", str(max(1, steps // 10)), "--eval-batches", "8",
            "--batch-size", str(batch_size),
            "--save-interval", "100", "--sample-bytes", "0", "--seed", str(seed), "--out", str(out),
            *CONFIGS[config]]


def saved_state(out):
    """The scalars of the run's checkpoint (train.py checks them), or None before its first save."""
    return read_checkpoint(out, False)[0] if (out / "train_state.safetensors").exists() else None


def train(config, seed, out, steps, batch_size, threads):
    """Train one run unless finished; continue a killed one from its checkpoint. A checkpoint of
    other flags (another --steps: its schedule spans other steps) is refused, not resumed."""
    flags = train_flags(config, seed, out, steps, batch_size)
    state = saved_state(out)
    if state is not None:
        want = {k: v for k, v in vars(train_py.parse_args(flags)[0]).items() if k not in NOT_SAVED | {"out"}}
        flag = lambda k: "--steps" if k == "max_steps" else f"--{k.replace('_', '-')}"
        differ = [f"{flag(k)} {state['args'][k]} (this study: {v})" for k, v in want.items()
                  if k in state["args"] and state["args"][k] != v]
        if differ:
            die(f"{out} holds a run with {', '.join(differ)}; give another --out, or delete {out} to train it anew")
        if state["step"] >= steps:
            return
        flags = ["--resume", "--out", str(out)]
    print(f"== {out.name}: train.py {' '.join(flags)}", flush=True)
    run_train(flags, threads)


def run_train(flags, threads):
    """train.py in a process group of its own, so that a signal reaches it once, from here: Ctrl-C,
    and a scheduler's SIGTERM or SIGHUP, which train.py answers by saving and stopping. Its exit
    status becomes the study's, with its one line (or one here if a signal killed it)."""
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    signals = (signal.SIGINT, *train_py.TERMINATE)
    previous = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum)) for s in signals}
    try:
        status = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if status < 0:
        tell(f"error: train.py was killed by {signal.Signals(-status).name}; run the same command again to continue")
        sys.exit(128 - status)
    if status:
        sys.exit(status)  # train.py said why in one line


def domains():
    """Three kinds of text that every Python install ships and training never sees: held-out
    standard-library code, English prose (pydoc_data's topic help, left out of training), and
    the other text files beside the library (build files, licence, changelogs, shell scripts)."""
    from pydoc_data.topics import topics
    as_doc = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).short()
    root, other = sysconfig.get_paths()["stdlib"], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith("."))
        for f in sorted(files):
            raw = Path(folder, f).read_bytes() if not f.endswith((".py", ".pyc")) else b""
            if raw and b"\0" not in raw:  # text only
                other.append(as_doc(raw))
    return {"code": load_documents(None)[1],
            "prose": [as_doc(t.encode()) for _, t in sorted(topics.items())],
            "other": other}


@torch.no_grad()
def expert_loads(model, texts):
    """-> {domain: [layer][expert] tokens routed}, and the same for each half of each domain."""
    layers = [b.ffn for b in model.layers if isinstance(b.ffn, MoE)]
    counts = torch.zeros(len(layers), model.args.n_routed_experts)

    def count(i):  # a forward hook on layer i's gate: its output is (weights, indices, scores)
        def hook(gate, inputs, out):
            counts[i] += out[1].flatten().bincount(minlength=counts.size(1))
        return hook
    hooks = [m.gate.register_forward_hook(count(i)) for i, m in enumerate(layers)]
    loads, halves = {}, {}
    model.eval()
    for name, docs in texts.items():
        rows = torch.cat([x for x, _ in val_batches(docs, SEQ_LEN, DOMAIN_ROWS, 1)])  # spread over the domain
        parts = []
        for half in rows.chunk(2):  # sequences in text order: two halves hold different files
            counts.zero_()
            model(half)
            parts.append(counts.clone())
        loads[name], halves[name] = (parts[0] + parts[1]).tolist(), [p.tolist() for p in parts]
    for h in hooks:
        h.remove()
    return loads, halves


def specialisation(loads):
    """loads: (domains, layers, experts) counts -> mean over layers of the mean over pairs of
    domains of the total variation distance between their expert-load distributions."""
    p = torch.as_tensor(loads, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    n = p.size(0)
    tv = [(p[i] - p[j]).abs().sum(-1) / 2 for i in range(n) for j in range(i + 1, n)]  # each (layers,)
    return float(torch.stack(tv).mean())


def read_loads(out, step):
    """expert_loads.json if it is whole and of the checkpoint's step, else None (compute it again)."""
    try:
        loads = json.loads((out / "expert_loads.json").read_bytes())
        return loads if loads.get("step") == step and {"loads", "halves"} <= loads.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def summarise(config, seed, out, state):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = len(lines)
    late = lines[int(steps * (1 - LATE)):]
    rates = sorted(r["tokens_per_s"] for r in lines[1:])
    loads = read_loads(out, state["step"])
    return dict(config=config, seed=seed, flags=CONFIGS[config], steps=steps, batch_size=state["args"]["batch_size"],
                threads=state.get("threads"),
                val_bpb=[r["val_bpb"] for r in lines if "val_bpb" in r][-1],
                maxvio_late=sum(r["maxvio_mean"] for r in late) / len(late),
                specialisation=specialisation(list(loads["loads"].values())),
                within=sum(specialisation(h) for h in loads["halves"].values()) / len(loads["halves"]),
                tokens_per_s=rates[len(rates) // 2],
                curves=dict(step=[r["step"] for r in lines], maxvio=[r["maxvio_mean"] for r in lines],
                            val_step=[r["step"] for r in lines if "val_bpb" in r],
                            val_bpb=[r["val_bpb"] for r in lines if "val_bpb" in r]),
                loads=loads["loads"])


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, torch {torch.__version__}"


def table(runs, meta):
    fmt = {"val_bpb": "{:.3f}", "maxvio_late": "{:.3f}", "specialisation": "{:.3f}", "within": "{:.3f}",
           "tokens_per_s": "{:,.0f}"}
    out = [f"Generated by `python docs/ablations.py` at commit {meta['commit']} on {meta['machine']}, "
           f"{meta['date']}; {meta['steps']} steps of {meta['batch_size']} x 256 bytes per run, {meta['threads']} thread(s), seeds {', '.join(map(str, SEEDS))}; "
           f"study wall time {meta['wall_min']:.0f} min. Each cell: mean of the seeds (seed 0 / seed 1).", "",
           "| config | train.py flags | val bits/byte | MaxVio, last 25% | specialisation | within-domain | tokens/s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for config in CONFIGS:
        rs = [r for r in runs if r["config"] == config]
        cells = []
        for k, f in fmt.items():
            vals = [r[k] for r in rs]
            cells.append(f"{f.format(sum(vals) / len(vals))} ({' / '.join(f.format(v) for v in vals)})")
        out.append(f"| {config} | `{' '.join(CONFIGS[config]) or '(defaults)'}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def what_ran(runs, key):
    """One value of a run's setting if all runs share it, else each run's (the table says what ran)."""
    values = [r[key] for r in runs]
    return values[0] if len(set(values)) == 1 else " / ".join(map(str, values))


def main(argv=None):
    p = Parser(prog="docs/ablations.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps per run (default: 200)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences of 256 bytes per step (default: 4)")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads per run: 1 is the fastest on a "
                   "busy 2-core machine (default: 1)")
    p.add_argument("--out", default=str(ROOT / "out" / "ablations"),
                   help="folder of the runs, and of the table and numbers (default: out/ablations)")
    p.add_argument("--publish", action="store_true", help="also write the table and numbers to docs/ablations.md "
                   "and docs/ablations.json, the study the README shows")
    a = p.parse_args(argv)
    t0, texts, runs = time.time(), None, []
    for config in CONFIGS:
        for seed in SEEDS:
            out = Path(a.out, run_name(config, seed))
            train(config, seed, out, a.steps, a.batch_size, a.threads)
            state = saved_state(out)
            if read_loads(out, state["step"]) is None:  # missing, torn, or of an earlier checkpoint
                texts = texts or domains()
                torch.set_num_threads(a.threads)
                loads, halves = expert_loads(Transformer.from_pretrained(out), texts)
                atomic_write(out / "expert_loads.json", lambda path: Path(path).write_text(
                    json.dumps(dict(step=state["step"], loads=loads, halves=halves))))
            runs.append(summarise(config, seed, out, state))
            print(f"== {out.name}: " + ", ".join(f"{k} {runs[-1][k]:.4g}" for k in
                  ("val_bpb", "maxvio_late", "specialisation", "within", "tokens_per_s")), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = dict(commit=commit + ("+changes" if dirty else ""), machine=machine(), steps=what_ran(runs, "steps"),
                batch_size=what_ran(runs, "batch_size"), threads=what_ran(runs, "threads"),
                date=datetime.date.today().isoformat(), wall_min=(time.time() - t0) / 60,
                specialisation="mean over layers of the mean over domain pairs of the total variation distance")
    md, study = table(runs, meta), json.dumps(dict(meta=meta, runs=runs))
    for folder in [Path(a.out)] + ([ROOT / "docs"] if a.publish else []):
        atomic_write(folder / "ablations.md", lambda path: Path(path).write_text(md))
        atomic_write(folder / "ablations.json", lambda path: Path(path).write_text(study))
    print(md + f"(table and numbers in {a.out}/ablations.md and .json" + (", and in docs/" if a.publish else "") + ")")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in train_py.TERMINATE:
        signal.signal(s, train_py.raise_terminated)
    guard_streams()
    try:
        main()
    except KeyboardInterrupt as e:  # while routing text through a model: train.py's runs report their own
        what, status = interruption(e)
        tell(f"error: {what}; finished runs are kept: run the same command again to continue")
        sys.exit(status)
    train_py.exit_if_streams_failed()
