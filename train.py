"""
Train DeepSeek-V3 on raw bytes: document packing, Fill-in-the-Middle, AdamW with a
warmup-constant-cosine schedule, multi-token prediction and auxiliary-loss-free balancing.

    python train.py                                   # tiny preset on CPU (small on GPU), ~13 min on 2 cores
    python train.py --max-steps 30                    # smoke run
    python train.py --resume                          # continue the run in out/, bit-exact on CPU
    python train.py --data notes/ --out out_notes     # your own text: a file, a folder or a glob
    python train.py --dry-run --preset deepseek-v3    # params, FLOPs, memory; builds nothing
    python infer.py --prompt "def "                   # sample from out/
Later stages, each a new run from a checkpoint:
    python train.py --init-from out --rope-factor 4 --seq-len 1024 --batch-size 4 --out out_long  # YaRN (§4.3)
    python train.py --make-sft sft.jsonl              # prompt/response pairs from the standard library
    python train.py --init-from out --sft sft.jsonl --out out_sft  # SFT with sample masking (§5.1)

Part 1, the recipe (§4.1-4.3, §5.1), in the order a step meets it:
    the recipe table ...... each number of the report's training, and where it lives here
    byte tokenizer, FIM ... ids 0-255 are the bytes, then four specials; PSM at rate 0.1 (§4.1)
    data .................. documents -> one shuffled stream per epoch -> packed rows -> batches
    schedule, evaluation .. LR and MTP weight λ by step; validation loss
    train_step, train ..... one optimizer step (losses, clip, AdamW, bias update); the loop
    the later stages ...... the batch size by tokens (§4.2); SFT samples packed into rows with
                            segment ids and the loss on the responses (§5.1)
Part 2, the harness: command line and presets, balancing modes, distributed helpers (the torchrun
    environment), signals and output streams, checks, checkpoints, --init-from and resume, SFT
    files, the run's files (metrics, progress, preemption, out/ lock), dry run, main.

Default data: the running Python's standard library (.py files; site-packages and tests left
out). 2.5% of the files, picked by a hash of their path, are held out for validation. out/ gets
config.json + model.safetensors (the published Hugging Face layout, what infer.py loads),
metrics.jsonl (a line per step) and train_state.safetensors/.json (exact training state, no pickle).
"""
import argparse
import ast
import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import signal
import stat
import sys
import sysconfig
import time
import warnings
from dataclasses import replace
from pathlib import Path


def exit_quietly_on_signals():
    """Ctrl-C, SIGTERM or SIGHUP while torch loads: one line and exit 128 + the signal's number, no
    traceback (main installs the handlers of the run)."""
    def leave(signum, frame):
        with contextlib.suppress(OSError):
            os.write(2, f"error: {'interrupted' if signum == signal.SIGINT else 'terminated'} while starting\n".encode())
        os._exit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, leave)


if __name__ == "__main__":
    exit_quietly_on_signals()

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model import (CheckpointError, ModelArgs, Transformer, accounting, atomic_write, memory_shortfall, read_file,
                   read_json, remove_stale_temporaries, training_memory)

# ==============================================================================================
# Part 1: the recipe
# ==============================================================================================
# DeepSeek-V3's pre-training recipe (§4.2; FIM §4.1): the paper's rules, with the sizes scaled
# down per preset. Where each number lives:
#   init std 0.006 for every matrix                ModelArgs.init_std (toy widths scale it up)
#   AdamW β1 0.9, β2 0.95, weight decay 0.1        BETAS, --weight-decay
#   gradient clipping at norm 1.0                  CLIP
#   LR: linear warmup over 2K steps to 2.2e-4,     schedule(): --lr, --warmup-steps,
#   constant until 10T of 14.8T tokens, cosine     --decay-start 0.68, --min-lr-frac 0.1
#   decay to 2.2e-5 (then 500B tokens at constant  (our cosine ends at the last step)
#   2.2e-5 and 7.3e-6)
#   MTP loss weight λ 0.3, then 0.1 after 10T      --mtp-weight, --mtp-weight-late (at --decay-start)
#   bias update speed γ 0.001 for the first        ModelArgs.bias_update_speed, --bias-update-speed
#   14.3T tokens, then 0                           (ours stays on to the end)
#   sequence-wise balance loss α 0.0001            ModelArgs.balance_alpha
#   4096 tokens a sequence; the sequences a step   micro_batches(): --batch-ramp, --batch-start;
#   grow from 3072 to 15360 over the first 469B    deepseek-v3's defaults (tiny, small: no ramp)
#   tokens, then stay
#   Fill-in-the-Middle, PSM, 10% of the documents  FIM_RATE, epoch_stream()
# Later stages, each a new run from a checkpoint (--init-from):
#   long context (§4.3): YaRN s = 40, β 32 / 1,    --rope-factor (model.py's precompute_freqs_cis,
#   √t = 0.1 ln s + 1; 1000 steps at LR 7.3e-6     yarn_mscale); STAGES: the LR, constant
#   SFT (§5.1): samples packed but mutually        pack_samples(), --sft; model(..., segment_ids);
#   invisible, loss on the responses, cosine LR    STAGES: the LR, cosine over two epochs
#   5e-6 -> 1e-6 over two epochs
BETAS, CLIP = (0.9, 0.95), 1.0
FIM_RATE = 0.1
VAL_FRACTION = 0.025  # share of the files held out for validation
SAMPLE_PROMPT = "def "


# ----------------------------------------------------------------------------------------------
# The byte tokenizer and Fill-in-the-Middle
EOT, FIM_BEGIN, FIM_HOLE, FIM_END = 256, 257, 258, 259  # ids 0..255 are the bytes themselves
SPECIALS = {EOT: "<|endoftext|>", FIM_BEGIN: "<|fim_begin|>", FIM_HOLE: "<|fim_hole|>", FIM_END: "<|fim_end|>"}


def encode(text):
    """str (as UTF-8) or bytes -> ids. A special's name inside the text stays plain bytes."""
    return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))


def decode(ids):
    """ids -> str: bytes as UTF-8 (invalid sequences become U+FFFD), specials by name."""
    out, run = [], bytearray()
    for i in map(int, ids):
        if 0 <= i < 256:
            run.append(i)
        else:
            out += [run.decode("utf-8", errors="replace"), SPECIALS.get(i, f"<|{i}|>")]
            run = bytearray()
    return "".join(out) + run.decode("utf-8", errors="replace")


def fim_prompt(prefix, suffix, encode=encode, fim=(FIM_BEGIN, FIM_HOLE, FIM_END)):
    """PSM prompt (§4.1): the model continues with the middle, then its end token. The byte
    tokenizer's unless given another tokenizer's encode and (begin, hole, end) ids."""
    begin, hole, end = fim
    return [begin, *encode(prefix), hole, *encode(suffix), end]


def fim_split(doc, rng):
    """Cut a document at two uniformly random positions into (prefix, middle, suffix)."""
    i, j = sorted((rng.randint(0, len(doc)), rng.randint(0, len(doc))))
    return doc[:i], doc[i:j], doc[j:]


# ----------------------------------------------------------------------------------------------
# Data: documents -> one stream per epoch -> packed rows -> micro-batches
def load_documents(data, skipped=None):
    """--data (None: this Python's standard library) -> (train, val): int16 tensors, one per text
    file, split by held_out(path relative to the data root). With too few files to hold one out,
    the tail of each file is held out instead. The paths of the files not read go to `skipped`."""
    root, paths, not_regular = find_files(data)
    skipped = [] if skipped is None else skipped
    skipped += not_regular
    train, val = [], []
    for path, raw in read_texts(paths, skipped):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        (val if held_out(rel) else train).append(torch.frombuffer(bytearray(raw), dtype=torch.uint8).short())
    if train and not val or val and not train:  # hold out the tail of each file (>= 1 byte)
        docs, cut = train + val, lambda d: min(len(d) - 1, math.ceil(len(d) * (1 - VAL_FRACTION)))
        train, val = [d[:cut(d)] for d in docs if cut(d) > 0], [d[cut(d):] for d in docs]
    check_documents(data, root, train, val, skipped)
    return train, val


def held_out(name):
    """Whether a file (by its path) or an SFT sample (by its prompt) is held out for validation: by a
    SHA-256 of the name, stable across runs and machines, unlike Python's salted hash()."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64 < VAL_FRACTION


def special(i):
    return torch.tensor([i], dtype=torch.int16)


def epoch_stream(docs, rng, fim_rate=FIM_RATE):
    """One epoch as one stream, <|endoftext|> doc <|endoftext|> doc ... in shuffled order, with a
    fim_rate share of the documents in PSM order (§4.1, DeepSeek-Coder):
    <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <|endoftext|>."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    pieces = [special(EOT)]  # a leading separator makes the first byte a target too
    for k in order:
        if rng.random() < fim_rate:
            prefix, middle, suffix = fim_split(docs[k], rng)
            pieces += [special(FIM_BEGIN), prefix, special(FIM_HOLE), suffix, special(FIM_END), middle]
        else:
            pieces.append(docs[k])
        pieces.append(special(EOT))
    return torch.cat(pieces)


def pack(stream, seq_len):
    """(inputs, targets), each (N, seq_len): rows of seq_len + 1 tokens at stride seq_len, so every
    token after the first is a target exactly once. No cross-document masking (as in the paper);
    the last row is padded with target -1, which the loss ignores."""
    n = max(1, math.ceil((len(stream) - 1) / seq_len))
    padded = torch.full((n * seq_len + 1,), -1, dtype=torch.int16)  # int16: 2 bytes a token in RAM
    padded[:len(stream)] = stream
    rows = padded.unfold(0, seq_len + 1, seq_len)
    return rows[:, :-1].clamp(min=0), rows[:, 1:]  # padding inputs: any id (their targets are -1)


class Batches:
    """Training micro-batches: (inputs, targets), and the segment ids for SFT. Epoch e is a pure
    function of (seed, e), so the position (epoch, index of the next batch) is all that --resume
    needs to regenerate the data."""

    def __init__(self, docs, seq_len, batch_size, seed, epoch=0, index=0, drop_last=False, sft=False):
        self.docs, self.seq_len, self.batch_size, self.seed, self.sft = docs, seq_len, batch_size, seed, sft
        self.epoch, self.index, self.order, self.drop_last = epoch, index, None, drop_last

    def load_epoch(self):
        rng = random.Random(f"{self.seed}:{self.epoch}")  # str seeds go through SHA-512: stable
        self.rows = (pack_samples(self.docs, self.seq_len, rng) if self.sft
                     else pack(epoch_stream(self.docs, rng), self.seq_len))
        self.order = list(range(len(self.rows[0])))
        rng.shuffle(self.order)  # a batch takes its rows from all over the epoch

    def __next__(self):
        if self.order is None:
            self.load_epoch()
        start, n = self.index * self.batch_size, len(self.order)
        # the last batch of an epoch may be short; data-parallel runs skip it (equal rows per rank)
        if start >= n or self.drop_last and start + self.batch_size > n:
            self.epoch, self.index = self.epoch + 1, 0
            self.load_epoch()
        ids = self.order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return tuple(t[ids].long() for t in self.rows)


def val_batches(docs, seq_len, batch_size, n_batches, sft=False):
    """Fixed validation set: held-out documents without FIM (or SFT samples in file order), up to
    n_batches * batch_size rows spread evenly over them."""
    rows = pack_samples(docs, seq_len) if sft else \
        pack(torch.cat([special(EOT)] + [t for d in docs for t in (d, special(EOT))]), seq_len)
    keep = torch.linspace(0, len(rows[0]) - 1, min(len(rows[0]), n_batches * batch_size)).round().long()
    return [tuple(t[ids].long() for t in rows) for ids in keep.split(batch_size)]


# ----------------------------------------------------------------------------------------------
# The schedule: LR and λ by step
def schedule(step, a):
    """(lr, MTP weight λ) for 0-based `step`, §4.2 in shape: linear warmup, constant, then from
    decay_start a cosine decay to min_lr_frac * lr at the last step, while λ drops 0.3 -> 0.1.
    In optimizer steps, also while the batch size ramps up (the report's are in tokens)."""
    decay_start = int(a.decay_start * a.max_steps)
    if step < decay_start:
        return a.lr * min(1.0, (step + 1) / max(1, a.warmup_steps)), a.mtp_weight
    t = min(1.0, (step - decay_start) / max(1, a.max_steps - decay_start))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))), a.mtp_weight_late


# ----------------------------------------------------------------------------------------------
# The training step and the loop
def train_step(model, fwd, optimizer, batches, micro, a, lr, mtp_weight, gamma, autocast, rank=0, world=1):
    """One optimizer step of `micro` micro-batches -> the step's losses (averaged over ranks),
    gradient norm and MaxVio. `fwd` is the model as called (data-parallel and/or compiled);
    `model` itself takes the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # forward and backward over the micro-batches, each rank on its share of every micro-batch
    logs = dict.fromkeys(("loss", "ce", "mtp", "balance"), 0.0)
    for _ in range(micro):
        x, y, *seg = (t[rank::world].to(a.device, non_blocking=True) for t in next(batches))
        seg = seg[0] if seg and not a.no_sample_mask else None  # SFT's samples: each sees itself only
        with autocast:  # CE + λ·MTP (eq. 25) + α·balance (eq. 17)
            _, losses = fwd(x, y, mtp_weight=mtp_weight, segment_ids=seg)
        (losses["loss"] / micro).backward()
        for k in logs:
            logs[k] += float(losses[k].detach()) / micro
    logs = dict(zip(logs, all_mean(list(logs.values()), world, a.device)))
    # clip the gradient norm at 1.0; a non-finite loss or gradient stops before the weights see it
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    stop_if_not_finite(logs["loss"], grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # aux-loss-free balancing (§2.1.2) from the expert loads of the whole step: every rank sums
    # the loads of the global batch and so applies the same bias update
    all_sum([moe.load for moe in model.moe_layers()], world)
    maxvio = model.update_bias(gamma)
    return dict(loss=logs["loss"], ce=logs["ce"], mtp_loss=logs["mtp"], balance_loss=logs["balance"],
                grad_norm=grad_norm, maxvio_mean=float(maxvio.mean()) if len(maxvio) else 0.0,
                maxvio_max=float(maxvio.max()) if len(maxvio) else 0.0)


def adamw(model, a):
    """AdamW (§4.2) -> (optimizer, parameter names in its order). Weight decay on every matrix, the
    embedding and head included: the paper names one decay and no exceptions, as nanoGPT does. Not
    on the 1-D RMSNorm gains, where decay would shrink activations rather than regularise. The
    routing bias is a buffer, not a parameter (§2.1.2)."""
    named = sorted(model.named_parameters(), key=lambda kv: kv[1].ndim < 2)  # matrices first
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": a.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=BETAS, fused=a.device.type == "cuda"), [k for k, _ in named]


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Next-byte cross-entropy of the main head, in nats per byte. Only byte targets count: the
    <|endoftext|> after each document is left out, so bits-per-byte is per byte of text. SFT
    batches bring segment ids: each sample is scored alone, on its response."""
    model.eval()
    nll, n = 0.0, 0
    for x, y, *seg in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x, segment_ids=seg[0].to(device)) if seg else model(x)
        mask = (y >= 0) & (y < 256)
        nll += F.cross_entropy(logits[mask].float(), y[mask], reduction="sum").item()
        n += int(mask.sum())
    model.train()
    return nll / n


def train(a, margs, init=None, sft=None):
    """Training: data, model and optimizer, then train_step until --max-steps (or --stop-at),
    validating every --eval-interval steps and saving every --save-interval; a sample at the end.
    A later stage starts from --init-from's weights `init`; SFT trains on `sft`, the (train,
    held-out) samples of --sft."""
    skipped = []
    train_docs, val_docs = sft or load_documents(a.data, skipped)
    rank, world, a.device = init_distributed(a.device)
    texts = [[ids for ids, _ in d] for d in sft] if sft else (train_docs, val_docs)  # their sizes
    check_run(a, margs, texts[0], skipped, rank, world)  # refusals before anything is allocated
    autocast = torch.autocast(a.device.type, torch.bfloat16) if a.dtype == "bfloat16" else contextlib.nullcontext()
    torch.manual_seed(a.seed)
    model = Transformer(margs).to(a.device)
    if init is not None:  # a new run from a checkpoint: its weights, a fresh optimizer and schedule
        model.load_state_dict(init, strict=False)  # all of it; a checkpoint may lack the MTP module
    # data parallel: gradients averaged over the ranks; buffers not broadcast, so that each rank
    # keeps its own expert-load counts until train_step sums them for the bias update
    fwd = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    fwd = torch.compile(fwd) if a.compile else fwd
    optimizer, param_names = adamw(model, a)
    gamma = bias_update_speed(a, margs)
    run = Run(a, margs, model, optimizer, param_names, *texts, rank, world)  # resumes with --resume
    batches = Batches(train_docs, a.seq_len, a.batch_size, a.seed, run.epoch, run.batch, world > 1, bool(sft))
    val = val_batches(val_docs, a.seq_len, a.batch_size, a.eval_batches, bool(sft))
    if run.step >= run.stop:
        return run.say(f"the run in {a.out}/ is at step {run.step} already; raise --max-steps to train on")
    if init is not None and rank == 0:  # where the later stage starts from
        run.say(f"step 0: val loss {evaluate(model, val, a.device, autocast):.4f} nats/byte ({a.init_from})")
        model.update_bias(0.0)
    with run.progress():
        for step in range(run.step, run.stop):
            t0 = time.perf_counter()
            lr, mtp_weight = schedule(step, a)
            micro = micro_batches(run.tokens, a)  # the batch-size ramp (§4.2): the same on every rank
            logs = train_step(model, fwd, optimizer, batches, micro, a, lr, mtp_weight, gamma, autocast, rank, world)
            logs.update(lr=lr, mtp_weight=mtp_weight, batch_size=micro * a.batch_size,
                        seconds=synchronized_time(a.device) - t0)
            if rank == 0 and (step + 1 == run.stop or (step + 1) % a.eval_interval == 0):
                logs["val_loss"] = evaluate(model, val, a.device, autocast)
                model.update_bias(0.0)  # the evaluation's expert loads must not steer the routing bias
            run.log(step + 1, logs, batches)  # the metrics line, the progress bar, the checkpoint
    run.finish()
    if rank == 0 and a.sample_bytes:  # SFT: the response to a held-out prompt, up to its end token
        model.eval()
        prompt = val_docs[0][0][:val_docs[0][1] + 1].tolist() if sft else encode(SAMPLE_PROMPT)  # <|endoftext|> prompt
        prompt = torch.tensor([prompt], device=a.device)
        torch.manual_seed(a.seed)
        with autocast:  # greedy decoding of a small byte model loops; sample as infer.py does
            ids = model.generate(prompt, min(a.sample_bytes, margs.max_seq_len - prompt.shape[1]),
                                 temperature=0.8, top_p=0.95, stop_tokens=(EOT,) if sft else ())
        print(f"sample (temperature 0.8, top-p 0.95):\n{decode(ids[0, 1 if sft else 0:].tolist())}")
    leave_distributed(world)


# ----------------------------------------------------------------------------------------------
# The later stages: the batch-size ramp (§4.2) and SFT's packed samples (§5.1)
def micro_batches(tokens, a):
    """Micro-batches of --batch-size in the step after `tokens` tokens (§4.2: "the batch size is
    gradually increased from 3072 to 15360 in the training of the first 469B tokens, and then keeps
    15360"): the step's sequences grow linearly in tokens from --batch-start to batch_size x
    grad_accum over the first --batch-ramp tokens, rounded down to whole micro-batches."""
    if not a.batch_ramp or tokens >= a.batch_ramp:
        return a.grad_accum
    first = a.batch_start // a.batch_size
    return first + (a.grad_accum - first) * tokens // a.batch_ramp


def tokens_before(step, a):
    """Tokens trained on in steps 0..step-1 (all ranks together)."""
    tokens = 0
    for _ in range(step):
        tokens += micro_batches(tokens, a) * a.batch_size * a.seq_len
    return tokens


def pack_samples(samples, seq_len, rng=None):
    """SFT (§5.1): samples (ids, prompt length), ids = <|endoftext|> prompt response <|endoftext|>,
    packed whole into rows in shuffled order (a new row where the next one does not fit; one longer
    than a row is cut) -> (inputs, targets, segment ids), each (N, seq_len). Targets are -1 on the
    prompts and the padding: the loss covers the responses and their end tokens. Segment ids
    count the samples of a row (the padding is one more), so that model(..., segment_ids) keeps
    them "isolated and mutually invisible", each at the positions it has alone."""
    order = list(range(len(samples)))
    if rng is not None:
        rng.shuffle(order)
    rows, used = [], seq_len
    for k in order:
        ids, n_prompt = samples[k]
        ids = ids[:seq_len + 1]
        if used + len(ids) - 1 > seq_len:
            rows.append([])
            used = 0
        targets = ids[1:].clone()
        targets[:n_prompt] = -1
        rows[-1].append((ids[:-1], targets, torch.full_like(targets, len(rows[-1]))))
        used += len(targets)

    def padded(row):  # inputs <|endoftext|> (any id), targets -1, a segment of its own
        pad = torch.full((seq_len - sum(len(x) for x, _, _ in row),), EOT, dtype=torch.int16)
        return [torch.cat(t) for t in zip(*row, (pad, torch.full_like(pad, -1), torch.full_like(pad, len(row))))]
    return tuple(torch.stack(t) for t in zip(*map(padded, rows)))


# ==============================================================================================
# Part 2: the harness. Command line, checks, checkpoints and the run's files, dry run, main.
# ==============================================================================================
PRESET_DEFAULTS = {"tiny": dict(batch_size=16, seq_len=256, lr=2e-3, grad_accum=1, batch_ramp=0),  # flags left unset
                   "small": dict(batch_size=32, seq_len=1024, lr=1e-3, grad_accum=1, batch_ramp=0),
                   # §4.2: 3072 -> 15360 sequences over 469B tokens, as 1 -> 5 micro-batches of 3072
                   "deepseek-v3": dict(batch_size=3072, seq_len=4096, lr=2.2e-4, grad_accum=5, batch_ramp=469 * 10**9)}
# --fp8 keeps float32 activations (FP8Matmul saves its input): the same tokens per step in two
# micro-batches, so that `python train.py --fp8` on one 80 GB GPU fits (dry run: 43.7 GiB, not 77.7)
FP8_DEFAULTS = {"small": dict(batch_size=16, grad_accum=2)}
DEFAULT_MAX_STEPS = 900  # `python train.py`: minutes on a laptop CPU, not hours
SCHEDULE_DEFAULTS = dict(decay_start=0.68, min_lr_frac=0.1)
# The later stages' schedules (their flags' defaults): the report's LRs as shares of its
# pre-training peak 2.2e-4, applied to the preset's peak
REPORT_PEAK_LR = 2.2e-4
STAGES = {"long context": dict(lr=7.3e-6, decay_start=1.0),  # §4.3: constant 7.3e-6 (then 1000 steps)
          "sft": dict(lr=5e-6, decay_start=0.0, min_lr_frac=0.2, warmup_steps=0)}  # §5.1: cosine 5e-6 -> 1e-6
SFT_EPOCHS = 2  # §5.1: --max-steps' default with --sft
STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
               "pydoc_data"}  # pydoc_data: generated English prose in one huge string, not Python

# --balance picks how the routed experts are kept evenly loaded, for the ablations of §4.5.2-3:
# each mode sets the bias update speed γ and the balance loss α * sum_i f_i P_i (eq. 17-20), with
# f and P taken per sequence or over the whole batch. AUX_ALPHA is DeepSeek-V2's expert-level
# balance factor α1 = 0.003 (arXiv 2405.04434, §3.1.2), the baseline V3's Table 5 compares against;
# taken as it is, since sum_i f_i P_i is 1 at perfect balance whatever the number of experts, and
# the presets already scale the learning rate through which the loss acts.
AUX_ALPHA = 0.003
BALANCE = {  # mode -> (help, ModelArgs overrides, whether the routing bias is updated)
    "aux-free": ("§2.1.2, the default: bias update with speed γ plus the complementary sequence-wise "
                 "loss with the preset's tiny α (1e-4)", {}, True),
    "aux-loss": (f"§4.5.2 (Table 5's baseline): DeepSeek-V2's expert-level auxiliary loss per sequence, "
                 f"α {AUX_ALPHA}, no bias", dict(balance_alpha=AUX_ALPHA), False),
    "batch-aux": (f"§4.5.3: the auxiliary loss with f and P over the whole batch, α {AUX_ALPHA}, no bias",
                  dict(balance_alpha=AUX_ALPHA, balance_scope="batch"), False),
    "none": ("no balancing: no bias update, no balance loss (the floor the others are measured against)",
             dict(balance_alpha=0.0), False),
}


def bias_update_speed(a, margs):
    """γ of this run: the preset's or --bias-update-speed in mode aux-free, else 0."""
    if a.no_bias_update or not BALANCE[a.balance][2]:
        return 0.0
    return margs.bias_update_speed if a.bias_update_speed is None else a.bias_update_speed


# ----------------------------------------------------------------------------------------------
# Command line (infer.py uses its helpers too)
def die(msg, every_rank=False):
    """One line, `error: <what is wrong>; <the fix>`, and exit 2. Under torchrun every rank meets
    the same bad flag or file: rank 0 alone says it, unless the error is the rank's own."""
    where, _ = read_launch_env()
    if every_rank or where is None or where[0] == 0:
        tell(f"error: {msg}")
    sys.exit(2)


def tell(line):
    """A line for the user on stderr, or on stdout where stderr can no longer be written."""
    for stream in (sys.stderr, sys.stdout):
        if stream is not None and getattr(stream, "error", None) is None:
            with contextlib.suppress(StreamFailed):
                print(line, file=stream, flush=True)
            if getattr(stream, "error", None) is None:
                return


def one_line(e):
    """An exception's text on one line (file errors can quote paths with newlines in them)."""
    return " ".join(str(e).split())


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; one line says enough
        die(f"{message} (see python {self.prog} --help)")


FLOAT32 = torch.finfo(torch.float32)  # bfloat16 has the same exponent range


def number(kind, low, high=math.inf, strict=False):
    """argparse type: a finite number >= low (> low if strict), <= high. Every float flag reaches
    float32 (or bfloat16) arithmetic, so a float must also be 0 or keep its value there: at least
    float32's smallest normal number (1.2e-38; below it a value turns subnormal or 0, and e.g.
    --top-p 1e-320 becomes 0 and masks every token) and at most its largest."""
    def parse(s):
        v = kind(s)
        if v < low or (strict and v == low) or not v <= high or v == math.inf:
            bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {s}")
        if kind is float and v != 0 and abs(v) < FLOAT32.tiny:
            zero = "0 or " if low < 0 or low == 0 and not strict else ""
            raise argparse.ArgumentTypeError(f"must be {zero}at least {FLOAT32.tiny:.4g} (float32's smallest normal "
                                             f"number; smaller ones become 0 in the computation), got {s}")
        if kind is float and abs(v) > FLOAT32.max:
            raise argparse.ArgumentTypeError(f"must be <= {FLOAT32.max:.4g} (float32's largest number), got {s}")
        return v
    parse.__name__ = kind.__name__  # so argparse says "invalid int value" for text
    return parse


def token_count(s):
    """A whole number, also written as 469e9."""
    v = float(s)
    if not math.isfinite(v) or v != int(v) or abs(v) > 2**62:
        raise ValueError(s)
    return int(v)


positive_int, count, nonneg, fraction = number(int, 1), number(int, 0), number(float, 0), number(float, 0, 1)
seed_number = number(int, 0, 2**64 - 1)  # what torch.manual_seed can hold
thread_count = number(int, 1, os.cpu_count() or 1)  # OpenMP crashes far above the core count


def get_parser():
    p = Parser(prog="train.py", description="Train DeepSeek-V3 on bytes; the docstring of train.py has examples.")
    add = p.add_argument
    add("--preset", help="model: tiny, small or deepseek-v3 (default: tiny on CPU, small on GPU)")
    add("--data", help="text file, folder (all text files below it) or glob (default: this Python's standard library)")
    add("--out", default="out", help="folder for the checkpoint and metrics.jsonl (default: out)")
    add("--max-steps", type=positive_int, help=f"optimizer steps; the schedules span them (default: {DEFAULT_MAX_STEPS}; "
        f"with --sft {SFT_EPOCHS} epochs, §5.1)")
    add("--stop-at", type=positive_int, help="stop with a checkpoint after this step, schedule unchanged; continue with --resume")
    add("--batch-size", type=number(int, 1, 2**20), help="sequences per micro-batch, over all ranks together "
        "(torchrun splits it; default: per preset)")
    add("--seq-len", type=number(int, 1, 2**24), help="tokens (bytes) per sequence (default: per preset)")
    add("--grad-accum", type=number(int, 1, 2**20), help="micro-batches per optimizer step (default: 1; 2 for small "
        "with --fp8; 5 for deepseek-v3)")
    add("--batch-ramp", type=number(token_count, 0), help="§4.2's batch-size ramp: over the first this many tokens the "
        "sequences per step grow from --batch-start to --batch-size x --grad-accum, as whole micro-batches; LR and λ "
        "stay scheduled by step (default: 469e9 for deepseek-v3, else 0: off)")
    add("--batch-start", type=positive_int, help="sequences in the first step of --batch-ramp, a multiple of "
        "--batch-size (default: a fifth of the final size, as 3072 of 15360 in §4.2)")
    add("--lr", type=number(float, 0, 1e30, strict=True), help="peak learning rate (default: per preset; the later "
        "stages take the report's, as a share of its peak 2.2e-4: 7.3e-6 with --rope-factor, 5e-6 with --sft)")
    add("--min-lr-frac", type=fraction, help="final LR / peak LR (§4.2: 2.2e-5 / 2.2e-4; default: 0.1; "
        "with --sft 0.2, §5.1: 1e-6 / 5e-6)")
    add("--warmup-steps", type=count, help="linear warmup steps (default: 5%% of --max-steps; with --sft 0)")
    add("--decay-start", type=fraction, help="fraction of the steps after which the LR decays and λ drops (§4.2: "
        "10T of 14.8T tokens; default: 0.68; with --rope-factor 1: constant, §4.3; with --sft 0: all cosine, §5.1)")
    add("--weight-decay", type=fraction, default=0.1, help="AdamW weight decay of the matrices (§4.2; default: 0.1)")
    add("--mtp", type=number(int, 0, 16), help="multi-token prediction depth, 0 disables it (default: the preset's)")
    add("--mtp-weight", type=nonneg, default=0.3, help="MTP loss weight λ before --decay-start (§4.2; default: 0.3)")
    add("--mtp-weight-late", type=nonneg, default=0.1, help="λ after --decay-start (§4.2; default: 0.1)")
    add("--bias-update-speed", type=fraction, help="γ of the aux-loss-free routing bias update, at most 1, the range "
        "of the sigmoid scores it shifts (default: the preset's; §4.2: 0.001)")
    add("--no-bias-update", action="store_true", help="γ = 0: freeze the routing bias (ablation)")
    add("--balance", choices=list(BALANCE), default="aux-free", help="expert load balancing: "
        + "; ".join(f"{k} = {v[0]}" for k, v in BALANCE.items()) + " (default: %(default)s)")
    add("--eval-interval", type=positive_int, default=100, help="steps between validations (default: 100)")
    add("--eval-batches", type=positive_int, default=8, help="validation batches (default: 8)")
    add("--save-interval", type=positive_int, default=200, help="steps between checkpoints (default: 200)")
    add("--sample-bytes", type=count, default=200, help=f"bytes to sample (temperature 0.8) after {SAMPLE_PROMPT!r} at the end, 0 skips (default: 200)")
    add("--seed", type=seed_number, default=0, help="seeds the initialisation and the data order (default: 0)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    add("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="autocast compute dtype; weights and AdamW stay float32 (default: bfloat16)")
    add("--compile", action="store_true", help="torch.compile the training forward")
    add("--fp8", action="store_true", help="FP8 block-quantized matmuls (§3.3)")
    add("--init-from", metavar="DIR", help="start a new run (fresh optimizer, schedule and steps) from the weights "
        "and architecture of the checkpoint in DIR: a train.py --out or a DeepSeek-V3-architecture folder (§4.3, §5.1)")
    add("--rope-factor", type=number(float, 1, 10**6, strict=True), metavar="S", help="with --init-from: YaRN with "
        "factor S over the length the checkpoint was trained at (§4.3: s = 40; β 32 / 1, √t = 0.1 ln S + 1), "
        "to train at a --seq-len up to S times that")
    add("--sft", metavar="FILE", help="with --init-from: supervised fine-tuning (§5.1) on FILE.jsonl, one "
        '{"prompt": ..., "response": ...} object a line (other keys ignored, blank lines skipped): samples packed '
        "into rows of --seq-len, each seeing only itself, the loss on the responses and their end token")
    add("--sft-val", metavar="FILE", help="held-out SFT pairs for validation, each scored alone (§5.1; default: "
        "FILE.val.jsonl beside --sft where it exists, else 2.5%% of --sft's samples by a hash of their prompt)")
    add("--no-sample-mask", action="store_true", help="ablation of §5.1's sample mask: packed SFT samples see each "
        "other and their positions run on, as pre-training's documents do (validation still scores each alone)")
    add("--make-sft", metavar="FILE", help="write an SFT task (§5.1) and exit: from --data (default: the standard library) "
        "each documented function whose sample fits --seq-len, prompt = its signature and docstring, response = its "
        "body; the held-out files' pairs go to FILE.val.jsonl")
    add("--resume", action="store_true", help="continue the run saved in --out; flags not given keep the run's values")
    add("--overwrite", action="store_true", help="start afresh in an --out that holds another run's checkpoint, deleting it")
    add("--dry-run", action="store_true", help="print parameters, FLOPs and memory of the preset, build nothing")
    return p


NOT_SAVED = {"resume", "overwrite", "dry_run", "stop_at", "device"}  # about this invocation, not the run


def parse_args(argv=None):
    parser = get_parser()
    a = parser.parse_args(argv)
    if a.init_from and a.preset:
        die(f"--init-from {a.init_from} brings its own architecture; drop --preset {a.preset}")
    if a.resume:  # argparse keeps attributes already in the namespace: the run's values become defaults
        saved = saved_args(os.path.join(a.out, "train_state.safetensors"), read_checkpoint(a.out, False)[0]["args"])
        a = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
    check_stage_flags(a)
    a.device = pick_device(a.device)
    preset = a.preset or ("small" if a.device.type == "cuda" else "tiny")  # --init-from: its defaults only
    a.preset = None if a.init_from else preset
    defaults = {**PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["tiny"]), **SCHEDULE_DEFAULTS,
                **(FP8_DEFAULTS.get(preset, {}) if a.fp8 else {})}
    stage = STAGES.get("sft" if a.sft else "long context" if a.rope_factor else None)
    if stage:  # the report's LR as a share of its peak, on the preset's peak
        defaults.update(stage, lr=defaults["lr"] * stage["lr"] / REPORT_PEAK_LR)
    for k, v in defaults.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    a.max_steps = DEFAULT_MAX_STEPS if a.max_steps is None and not a.sft else a.max_steps  # --sft: load_sft
    a.warmup_steps = max(1, a.max_steps // 20) if a.warmup_steps is None else a.warmup_steps
    check_batch_ramp(a)
    if a.bias_update_speed is not None and not BALANCE[a.balance][2]:
        die(f"--bias-update-speed sets the routing bias of --balance aux-free; --balance {a.balance} has none")
    overrides = {**({} if a.mtp is None else {"n_mtp": a.mtp}), **({"fp8": True} if a.fp8 else {}), **BALANCE[a.balance][1]}
    if a.init_from:
        return a, checkpoint_args(a, overrides)
    try:
        return a, ModelArgs.from_preset(a.preset, **overrides)
    except (ValueError, TypeError) as e:
        die(f"--preset {a.preset}: {e}")


def check_stage_flags(a):
    """The later stages' flags need a checkpoint to start from, and each other."""
    for flag, value in (("--rope-factor", a.rope_factor), ("--sft", a.sft)):
        if value and not a.init_from:
            die(f"{flag} continues a trained model; add --init-from DIR (the --out of a pre-training run)")
    if a.sft and a.data:
        die(f"--sft {a.sft} trains on its own samples; drop --data {a.data}")
    if (a.sft_val or a.no_sample_mask) and not a.sft:
        die(f"{'--sft-val' if a.sft_val else '--no-sample-mask'} belongs to SFT; add --sft FILE")
    if a.init_from and not a.resume and os.path.realpath(a.init_from) == os.path.realpath(a.out):
        die(f"--out {a.out} is the --init-from checkpoint; a new run writes to its own --out")


def check_batch_ramp(a):
    """--batch-start: whole micro-batches of --batch-size, at most the final size (its default a
    fifth of that, as 3072 of 15360 in §4.2)."""
    final = a.batch_size * a.grad_accum
    if not a.batch_ramp:
        if a.batch_start:
            die(f"--batch-start {a.batch_start} is where --batch-ramp starts; add --batch-ramp TOKENS")
        return
    a.batch_start = a.batch_start or max(1, final // 5 // a.batch_size) * a.batch_size
    if a.batch_start % a.batch_size or a.batch_start > final:
        die(f"--batch-start {a.batch_start} must be a multiple of --batch-size {a.batch_size} and at most the final "
            f"--batch-size x --grad-accum = {final} sequences; the ramp adds whole micro-batches")


def saved_args(path, args):
    """The run's saved flags, each re-read by the parser itself, so that it meets its flag's type,
    bounds and choices; a value that does not come back as it was saved is refused."""
    parser = get_parser()
    switch = {action.dest: action.nargs == 0 for action in parser._actions if action.dest != "help"}
    saved = {k: v for k, v in args.items() if k in switch and k not in NOT_SAVED and v is not None}

    def refuse(message):
        raise ValueError(message)
    parser.error = refuse  # instead of exiting with argparse's message
    for k, v in saved.items():
        flag = f"--{k.replace('_', '-')}"
        try:
            back = getattr(parser.parse_args([] if v is False else [flag] if v is True else [f"{flag}={v}"]), k)
        except ValueError:
            back = None
        if back != v or type(back) is not type(v) and type(v) is not int:  # JSON may write a float as an int
            bad_resume(path, f"saved {flag} as {v!r}, which the flag does not accept")
        saved[k] = back
    return saved


def pick_device(name):
    """--device (None: cuda when there is one, else cpu) -> torch.device, or a one-line error."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"--device {name}: not a device name; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        die(f"--device {name}: only cpu and cuda are supported; use --device cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun: one process per rank, each the identity in one process)
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")  # torchrun sets all three in every rank it starts


def read_launch_env(env=None):
    """Am I a rank of a torchrun launch, and which? -> ((rank, local rank, world size), None), with
    (0, 0, 1) where none of the launcher's variables is set, or (None, what is wrong) for a partial
    or inconsistent set: a RANK=1 left in the shell must not make a plain run a silent rank 1 that
    skips out/'s lock. Every rank-0-only guard (the lock, the printing, the saving) goes by it."""
    env = os.environ if env is None else env
    given = [k for k in LAUNCH_VARS if k in env]
    if not given and "TORCHELASTIC_RUN_ID" not in env:  # TORCHELASTIC_RUN_ID: torchrun's own marker
        return (0, 0, 1), None
    unset = "unset " + " ".join(k for k in (*LAUNCH_VARS, "TORCHELASTIC_RUN_ID") if k in env)
    if len(given) < len(LAUNCH_VARS):
        have = " and ".join(f"{k}={env[k]}" for k in given) or f"TORCHELASTIC_RUN_ID={env['TORCHELASTIC_RUN_ID']}"
        missing = " and ".join(k for k in LAUNCH_VARS if k not in env)
        return None, (f"{have} set without {missing} (left over from another launch?); {unset} "
                      "to run as one process, or start with torchrun")
    values = " ".join(f"{k}={env[k]}" for k in LAUNCH_VARS)
    try:
        world, rank, local = (int(env[k]) for k in LAUNCH_VARS)
    except ValueError:
        return None, f"{values}: not integers; {unset} to run as one process, or start with torchrun"
    if not (world >= 1 and 0 <= local <= rank < world):
        return None, f"{values} do not fit together (0 <= LOCAL_RANK <= RANK < WORLD_SIZE); {unset}, or start with torchrun"
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        return None, (f"{values} without MASTER_ADDR and MASTER_PORT: no launcher started this process; "
                      f"start it with torchrun --nproc-per-node {world}, or {unset} to run as one process")
    return (rank, local, world), None


def launch_env():
    """-> (rank, local rank, world size) of this process, or a one-line error (see read_launch_env)."""
    where, problem = read_launch_env()
    if problem:
        die(problem, every_rank=True)
    return where


def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1) each process is one rank: gloo on CPU, NCCL on CUDA (one GPU
    per rank). -> (rank, world size, this rank's device)."""
    rank, local, world = launch_env()
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    # train.py keeps each rank's expert loads its own with DDP(broadcast_buffers=False); torch 2.13
    # deprecates that flag, but its replacement still syncs buffers at init, and its warning itself
    # says to keep the flag for rank-local buffers: so the warning is silenced, not the flag changed
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    if device.type == "cuda" and local >= torch.cuda.device_count():
        die(f"rank {rank}: LOCAL_RANK {local}, but {torch.cuda.device_count()} CUDA GPUs are visible; start at "
            "most one rank per GPU (torchrun --nproc-per-node)", every_rank=True)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as e:  # e.g. MASTER_PORT taken, or a peer that never came
        die(f"rank {rank}: cannot join the torchrun group ({one_line(e)}); start the run with torchrun", every_rank=True)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def leave_distributed(world):
    """End a torchrun rank: destroy the process group, flush, and exit without Python's shutdown.
    Gloo's worker threads can outlive destroy_process_group (here once a model has been built on
    the meta device, as the memory check and sharded loading do) and free a collective's tensors
    while the interpreter shuts down, which aborts the rank with SIGABRT ("terminate called
    without an active exception"; about one run in ten on a busy machine)."""
    if world > 1:
        torch.distributed.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


def all_mean(values, world, device):
    """Average a list of floats over the ranks. The reduction runs on the training device: NCCL
    reduces CUDA tensors only."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / world).tolist()


def all_max(value, world, device):
    """The largest of an integer over the ranks."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def all_sum(tensors, world):
    """Sum each tensor over the ranks, in place."""
    for t in tensors if world > 1 else ():
        torch.distributed.all_reduce(t)


def synchronized_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# Signals and output streams: a scheduler's SIGTERM, a closed pipe, a full disk under `> log`
TERMINATE = (signal.SIGTERM, signal.SIGHUP)  # a scheduler preempting the job; a closed terminal


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP raised as Ctrl-C is, so that every place that reports Ctrl-C reports it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_terminated(signum, frame):
    raise Terminated(signum)


def interruption(e):
    """A KeyboardInterrupt -> (what happened, exit status 128 + the signal's number)."""
    signum = getattr(e, "signum", signal.SIGINT)
    return ("interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"), 128 + signum


class StreamFailed(Exception):
    """Raised by a guarded stream that was asked to (infer.py: nobody reads the text any more)."""


class Guarded:
    """sys.stdout or sys.stderr of the scripts. A write that fails (the reader of a pipe gone, a full
    disk under `> log`) raises nothing, or StreamFailed once where `fatal`: the stream goes quiet,
    its descriptor is pointed at /dev/null (what is still buffered drains there, also at exit,
    instead of a second error), and `error` keeps the OSError for the one line at the end."""

    def __init__(self, stream, fatal=False):
        self.stream, self.fatal, self.error = stream, fatal, None
        if stream is None:  # started with the descriptor closed (`>&-`): Python made it None
            self.stream, self.error = open(os.devnull, "w"), OSError(9, "closed")

    def write(self, text):
        if self.error is None:
            try:
                self.stream.write(text)
            except (OSError, ValueError) as e:  # ValueError: written after a close
                self.fail(e)
        return len(text)

    def flush(self):
        if self.error is None:
            try:
                self.stream.flush()
            except (OSError, ValueError) as e:
                self.fail(e)

    def fail(self, e):
        self.error = e if isinstance(e, OSError) else OSError(9, "closed")
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        if self.fatal:
            raise StreamFailed(self.error)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def guard_streams(fatal=False):
    """Wrap sys.stdout and sys.stderr in Guarded; stdout flushes at each line, so that a log file
    follows the run and a failing write shows at the line that failed."""
    for fd in (1, 2):  # a descriptor closed at start: /dev/null on it, so no file opened later takes it
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)
    sys.stdout, sys.stderr = Guarded(sys.stdout, fatal), Guarded(sys.stderr, fatal)


def stream_failure():
    """-> (name, OSError) of the first of stdout and stderr that could not be written, or None."""
    for name in ("stdout", "stderr"):
        e = getattr(getattr(sys, name), "error", None)
        if e is not None:
            return name, e
    return None


def stream_status(e):
    """Exit status for a stream that failed with OSError e: 141 for a closed pipe (128 + SIGPIPE, as
    a process that SIGPIPE kills reports it), 1 for anything else (a full disk, an I/O error)."""
    return 128 + signal.SIGPIPE if isinstance(e, BrokenPipeError) else 1


def stream_problem(name, e):
    return f"cannot write to {name} ({e.strerror or e})"


def exit_if_streams_failed(done=""):
    """At the end of a script: flush; if a stream failed, one line on the other and its exit status."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, StreamFailed):
            stream.flush()
    if failed := stream_failure():
        tell(f"error: {stream_problem(*failed)}; what was printed after that is lost{done}")
        sys.exit(stream_status(failed[1]))


# ----------------------------------------------------------------------------------------------
# Checks: the data, the run's size, the loss
def regular(path):
    """Only regular files are read: a FIFO would block forever, a device (or a symlink to one) never
    ends, a dangling symlink has nothing behind it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def find_files(data):
    """--data (None: this Python's standard library) -> (root, sorted file paths, files skipped as
    not regular)."""
    if data is None:
        root, suffix, skip = sysconfig.get_paths()["stdlib"], ".py", STDLIB_SKIP
    elif os.path.isdir(data):
        root, suffix, skip = data, "", {"__pycache__"}
    elif regular(data):
        return os.path.dirname(os.path.abspath(data)), [data], []
    elif os.path.lexists(data):
        what = "a symlink to nothing" if not os.path.exists(data) else "not a regular file (a FIFO, socket or device)"
        die(f"--data {data}: {what}; pass a text file, a folder or a glob")
    elif any(c in data for c in "*?["):
        paths = sorted(glob.glob(data, recursive=True))
        files = [p for p in paths if regular(p)]
        return (os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files] or ["."]), files,
                [p for p in paths if not regular(p) and not os.path.isdir(p)])
    else:
        die(f"--data {data}: no such file or folder; pass a text file, a folder or a glob")
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        paths += [os.path.join(folder, f) for f in files if f.endswith(suffix) and not f.startswith(".")]
    return root, sorted(p for p in paths if regular(p)), sorted(p for p in paths if not regular(p))


def read_texts(paths, skipped):
    """-> (path, bytes) of each readable file that is not empty and not binary; the unreadable
    (permissions, or gone since the listing) go to `skipped`."""
    for path in paths:
        try:
            raw = Path(path).read_bytes()
        except OSError:
            skipped.append(path)
            continue
        if raw and b"\0" not in raw[:8192]:
            yield path, raw


def check_documents(data, root, train, val, skipped):
    unread = f" ({len(skipped)} not regular or unreadable files skipped, e.g. {skipped[0]})" if skipped else ""
    if not train and not val:
        die(f"--data {data or root}: no text found{unread}; point --data at a text file or a folder of text files")
    if not train:
        die(f"--data {data or root}: {sum(map(len, val))} bytes of text, too little to train on what the "
            f"validation split leaves{unread}; give more text")


def check_run(a, margs, train_docs, skipped, rank, world):
    """Refuse a run that cannot work before anything is allocated; make CPU runs deterministic."""
    if skipped and rank == 0:
        print(f"warning: --data: skipped {len(skipped)} files that are not regular or not readable, e.g. {skipped[0]}")
    if a.batch_size % world:
        die(f"--batch-size {a.batch_size} does not split over {world} ranks; use a multiple of {world}")
    rows = math.ceil(sum(len(d) + 1 for d in train_docs) / a.seq_len)  # an epoch has at least these
    if world > 1 and rows < a.batch_size:
        die(f"--data: {rows} rows of {a.seq_len} tokens, fewer than one --batch-size {a.batch_size} to split over "
            f"{world} ranks; lower --batch-size or --seq-len, or give more text")
    check_memory(a, margs, world)
    if a.device.type == "cpu":  # deterministic kernels make --resume bit-exact: with 2+ threads
        torch.use_deterministic_algorithms(True)  # the backward of x[idx] (MoE dispatch) sums in racy order
        torch.utils.deterministic.fill_uninitialized_memory = False  # exactness needs no NaN-filled empty()


def check_memory(a, margs, world):
    """Refuse a run whose step does not fit the device, by the dry run's estimator (weights,
    gradients, AdamW moments, activations, logits), on this device's attention and precision. The
    expert rows are counted exactly (N*K), not padded as the dry run assumes: a floor, so that a
    run is refused only where it cannot fit. Names the largest --batch-size that fits."""
    autocast = a.dtype == "bfloat16" and not a.fp8
    attention = "fused" if a.device.type == "cuda" or margs.qk_head_dim == margs.v_head_dim else "math"  # CPU: math
    peak = lambda b: training_memory(margs, b, a.seq_len, autocast, attention, 1.0, a.grad_accum)["peak"]
    per_rank = a.batch_size // world
    if not (short := memory_shortfall(peak(per_rank), a.device)):
        return
    low, high = 0, 1 if memory_shortfall(peak(1), a.device) else per_rank  # peak(low) fits (0: none), peak(high) not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if memory_shortfall(peak(mid), a.device) is None else (low, mid)
    fix = (f"the largest --batch-size that fits is {low * world}" if low else
           f"not even --batch-size {world} fits; choose a smaller --preset or a lower --seq-len")
    die(f"--batch-size {a.batch_size} x --seq-len {a.seq_len} of --preset {a.preset}: training (weights, gradients, "
        f"AdamW moments and activations, as --dry-run counts them) {short}; {fix} "
        f"(python train.py --dry-run --preset {a.preset} shows the memory)")


class NotFinite(Exception):
    pass


def stop_if_not_finite(loss, grad_norm):
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NotFinite(f"loss {loss:.4g} or gradient norm {grad_norm:.4g} not finite")


# ----------------------------------------------------------------------------------------------
# Checkpoints: the published layout for infer.py, and the exact state for --resume
def model_tensors(model):
    # named_parameters/named_buffers list a shared tensor once (MTP reuses the embedding and head)
    persistent = model.state_dict().keys()
    return {**dict(model.named_parameters()), **{k: b for k, b in model.named_buffers() if k in persistent}}


def save_checkpoint(out, model, optimizer, state):
    """Published-layout weights for infer.py, then the resume point: train_state.safetensors holds
    all that --resume reads (weights, routing biases, AdamW moments by parameter index, RNG states,
    and the scalars as metadata), so its one os.replace commits the checkpoint and a kill at any
    moment leaves a consistent one. train_state.json is a readable copy of the scalars."""
    model.save_pretrained(out)
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    for i, s in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{i}.{k}": v for k, v in s.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors, meta = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"train_state": json.dumps(state)}
    atomic_write(os.path.join(out, "train_state.safetensors"), lambda p: save_file(tensors, p, metadata=meta))
    atomic_write(os.path.join(out, "train_state.json"), lambda p: Path(p).write_text(json.dumps(state, indent=1)))


def bad_resume(path, what):
    die(f"--resume: {path} {what}; start afresh in another --out (or with --overwrite), "
        "or restore a good copy of the checkpoint")


STATE_INTS = ("step", "epoch", "batch")  # with args, param_names, data: what --resume reads


def read_checkpoint(out, with_tensors=True):
    """-> (scalars, tensors) of out/train_state.safetensors, each checked for what --resume needs:
    the file may be truncated, foreign or edited."""
    path = os.path.join(out, "train_state.safetensors")
    if not os.path.exists(path):
        die(f"--resume: no checkpoint in {out}/ (train_state.safetensors is missing); drop --resume or fix --out")
    if not regular(path):
        bad_resume(path, "is not a regular file")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if with_tensors}
        state = json.loads(meta["train_state"])
    except (SafetensorError, OSError) as e:
        bad_resume(path, f"is not a readable safetensors file ({one_line(e)})")
    except KeyError:
        bad_resume(path, "has no train_state metadata (not a checkpoint of train.py)")
    except (ValueError, RecursionError):
        bad_resume(path, "holds train_state metadata that is not JSON")
    if not isinstance(state, dict):
        bad_resume(path, "holds train_state metadata that is not a JSON object")
    for k in STATE_INTS:
        if type(state.get(k)) is not int or state[k] < 0:
            bad_resume(path, f"has train_state {k} {state.get(k)!r}, not an integer >= 0")
    if not isinstance(state.get("args"), dict) or not isinstance(state.get("param_names"), list):
        bad_resume(path, "lacks the run's args or param_names")
    return state, tensors


def load_checkpoint(out, model, optimizer, param_names):
    """Restore the weights, routing biases, AdamW moments and RNG state saved in out/; each tensor
    is checked against what this model expects before any is copied."""
    state, tensors = read_checkpoint(out)
    path = os.path.join(out, "train_state.safetensors")
    own = {f"model.{k}": v for k, v in model_tensors(model).items()}
    if state["param_names"] != param_names or any(k not in tensors or tensors[k].shape != v.shape for k, v in own.items()):
        die(f"the checkpoint in {out}/ holds another model than these flags build; resume without model flags")
    params = dict(model.named_parameters())
    moments = {}
    for k, v in tensors.items():  # optim.{parameter index}.{step, exp_avg, exp_avg_sq}
        if k.startswith("optim."):
            _, i, name = (k.split(".", 2) + ["", ""])[:3]
            moments.setdefault(i, {})[name] = v
    for i, m in moments.items():
        p = params[param_names[int(i)]] if i.isdigit() and int(i) < len(param_names) else None
        if p is None or m.keys() != {"step", "exp_avg", "exp_avg_sq"}:
            bad_resume(path, f"holds AdamW state optim.{i} with {sorted(m)}, not step, exp_avg, exp_avg_sq "
                             "of one of the model's parameters")
        if m["exp_avg"].shape != p.shape or m["exp_avg_sq"].shape != p.shape or m["step"].numel() != 1 \
                or not all(t.is_floating_point() for t in m.values()):
            bad_resume(path, f"holds AdamW moments of {param_names[int(i)]} of the wrong shape or type "
                             f"({tuple(m['exp_avg'].shape)}, {tuple(m['exp_avg_sq'].shape)}; the parameter is {tuple(p.shape)})")
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        bad_resume(path, "lacks a CPU random-number state (rng.cpu, uint8) of this torch")
    for k, v in tensors.items():  # a run that diverged, or a damaged file: training on would spread it
        if v.is_floating_point() and not torch.isfinite(v).all():
            i = int(k.split(".")[1]) if k.startswith("optim.") else None
            what = "" if i is None else f" (AdamW state of {param_names[i]})"
            die(f"--resume: {k}{what} in {out}/train_state.safetensors holds NaN or inf (a diverged run or a "
                "damaged file); start afresh without --resume, or resume a copy of an earlier checkpoint")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
    optimizer.load_state_dict({"state": {int(i): m for i, m in moments.items()},
                               "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(rng)
    if torch.cuda.is_available() and f"rng.cuda.{torch.cuda.device_count() - 1}" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    return state


def kept_metrics(path, step):
    """The lines of metrics.jsonl up to `step` (--resume drops those logged after the checkpoint).
    Each line must be a JSON object with an integer step, except a last line cut short by a kill."""
    if not os.path.exists(path):
        return []
    if not regular(path):
        die(f"--resume: {path} is not a regular file; move it away")
    lines = Path(path).read_bytes().split(b"\n")
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or type(rec.get("step")) is not int:
                raise ValueError("not a JSON object with an integer step")
        except (ValueError, RecursionError) as e:
            if n == len(lines):  # empty after the final newline, or torn by a kill
                break
            what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not a JSON object with an integer step"
            die(f"--resume: {path} line {n} is {what}; delete that line or the file (it is a log, not the checkpoint)")
        if rec["step"] <= step:
            kept.append(line.decode("utf-8") + "\n")
    return kept


# ----------------------------------------------------------------------------------------------
# --init-from: a new run from a checkpoint's weights, with its architecture (§4.3, §5.1)
def read_config(folder, flag):
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not regular(path):
        what = "no config.json in it" if os.path.isdir(folder) else "no such folder"
        die(f"{flag} {folder}: not a checkpoint ({what}); pass the --out of a train.py run or a folder in the "
            "published DeepSeek-V3 layout")
    try:  # model.read_file: a regular file of bounded size, as every checkpoint file is read
        return ModelArgs.from_hf_config(json.loads(read_file(path, fix="fix it or pass another checkpoint")))
    except CheckpointError as e:
        die(f"{flag} {folder}: {one_line(e)}")
    except (ValueError, TypeError, RecursionError) as e:
        die(f"{flag} {folder}: its config.json is not usable ({one_line(e)}); fix it or pass another checkpoint")


def trained_length(folder, margs):
    """The sequence length a checkpoint was trained at: a train.py run's --seq-len (its
    train_state.json), else max_position_embeddings."""
    try:
        args = read_json(os.path.join(folder, "train_state.json")).get("args")
    except CheckpointError:
        args = None
    seq = args.get("seq_len") if isinstance(args, dict) else None
    return seq if type(seq) is int and 0 < seq <= margs.max_seq_len else margs.max_seq_len


def checkpoint_args(a, overrides):
    """--init-from's architecture (its config.json; a resumed run's own, in --out) with this run's
    training switches (--fp8, --balance), and with --rope-factor S YaRN over the length the
    checkpoint was trained at (§4.3), which the saved config.json carries as rope_scaling."""
    folder, flag = (a.out, "--resume") if a.resume else (a.init_from, "--init-from")
    margs = read_config(folder, flag)
    if a.mtp is not None and a.mtp != margs.n_mtp:
        die(f"--mtp {a.mtp}: {folder} has {margs.n_mtp} MTP modules (num_nextn_predict_layers); drop --mtp")
    if margs.vocab_size < 256 + len(SPECIALS):
        die(f"{flag} {folder}: a vocabulary of {margs.vocab_size} ids cannot hold the byte tokenizer's "
            f"{256 + len(SPECIALS)}; start from a checkpoint of train.py or a larger vocabulary")
    margs = replace(margs, **{k: v for k, v in overrides.items() if k != "n_mtp"})
    if a.rope_factor:
        trained = margs.original_seq_len if margs.rope_factor > 1 else trained_length(folder, margs)
        if a.seq_len > a.rope_factor * trained:
            die(f"--seq-len {a.seq_len} is beyond --rope-factor {a.rope_factor:g} x the {trained} positions {folder} "
                f"was trained at; lower --seq-len to {int(a.rope_factor * trained)} or raise --rope-factor")
        margs = replace(margs, rope_factor=a.rope_factor, original_seq_len=trained,
                        max_seq_len=max(margs.max_seq_len, int(a.rope_factor * trained)))
    return margs


def init_weights(a, margs):
    """--init-from's weights as a state dict on the CPU, read and checked before --out is touched."""
    try:
        init = Transformer.from_pretrained(a.init_from)
    except CheckpointError as e:
        die(f"--init-from {a.init_from}: {one_line(e)}")
    if init.args.n_mtp < margs.n_mtp and launch_env()[0] == 0:
        print(f"note: {a.init_from} holds no MTP layers; the MTP module starts from its initialisation")
    return init.state_dict()


# ----------------------------------------------------------------------------------------------
# SFT files (§5.1): the samples of --sft, and --make-sft's task from Python source
def read_sft(path, seq_len, flag):
    """One JSON object a line with string "prompt" and "response" (other keys ignored, blank lines
    skipped) -> samples (ids, prompt length), ids = <|endoftext|> prompt response <|endoftext|>."""
    if not regular(path):
        die(f"{flag} {path}: {'not a regular file' if os.path.lexists(path) else 'no such file'}; pass a .jsonl "
            "file (python train.py --make-sft FILE writes one)")
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        die(f"{flag} {path}: cannot read it ({e.strerror}); fix its permissions")
    samples, fix = [], 'write one {"prompt": "...", "response": "..."} object a line'
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "response")):
                die(f"{flag} {path} line {n} has no string \"prompt\" and \"response\"; {fix}")
            prompt, response = encode(rec["prompt"]), encode(rec["response"])
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or a lone surrogate
            die(f"{flag} {path} line {n} is not a JSON object of UTF-8 text; {fix}")
        if len(prompt) >= seq_len:
            die(f"{flag} {path} line {n}: a prompt of {len(prompt)} bytes leaves no room for its response in "
                f"--seq-len {seq_len}; raise --seq-len or shorten the prompt")
        samples.append((torch.tensor([EOT, *prompt, *response, EOT], dtype=torch.int16), len(prompt)))
    if not samples:
        die(f"{flag} {path} holds no samples; {fix}")
    return samples


def held_out_file(path):
    """FILE.jsonl -> FILE.val.jsonl: where --make-sft writes, and --sft finds, the held-out pairs."""
    return (path[:-len(".jsonl")] if path.endswith(".jsonl") else path) + ".val.jsonl"


def load_sft(a):
    """--sft and its held-out pairs (--sft-val, or FILE.val.jsonl beside it, or 2.5% of its samples
    by a hash of the prompt) -> (train, val); --max-steps defaults to SFT_EPOCHS epochs."""
    train_set = read_sft(a.sft, a.seq_len, "--sft")
    beside = held_out_file(a.sft)
    a.sft_val = a.sft_val or (beside if os.path.exists(beside) else None)
    if a.sft_val:
        val = read_sft(a.sft_val, a.seq_len, "--sft-val")
    else:  # with too few samples to hold one out, the last one is validated on too
        held = [held_out(decode(ids[1:n + 1])) for ids, n in train_set]
        val = [s for s, h in zip(train_set, held) if h] or train_set[-1:]
        train_set = [s for s, h in zip(train_set, held) if not h] or train_set
    if a.max_steps is None:
        rows = len(pack_samples(train_set, a.seq_len)[0])
        a.max_steps = max(1, math.ceil(SFT_EPOCHS * rows / (a.batch_size * a.grad_accum)))
    return train_set, val


def documented_functions(raw):
    """(prompt, response, line) for each function in Python source `raw` with a docstring and code
    after it: prompt = from `def` to the docstring's end, response = the rest, dedented to `def`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for an invalid escape
            text = raw.decode("utf-8")
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    lines = text.splitlines(keepends=True)
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                       key=lambda n: n.lineno):  # in file order
        if len(node.body) < 2 or ast.get_docstring(node, clean=False) is None or \
                node.body[1].lineno <= node.body[0].end_lineno:
            continue
        indent, fn = node.col_offset, lines[node.lineno - 1:node.end_lineno]
        if any(line[:indent].strip() for line in fn):  # a line left of the def (inside a string)
            continue
        fn = [line[indent:] if line.strip() else line.lstrip(" \t") for line in fn]
        k = node.body[0].end_lineno - node.lineno + 1
        yield "".join(fn[:k]), "".join(fn[k:]), node.lineno


def make_sft(a):
    """--make-sft FILE: the pairs of documented_functions in --data whose sample fits --seq-len;
    those of the files held out from pre-training (held_out, as load_documents splits) go to
    FILE.val.jsonl, so that SFT is validated on functions the base model never saw."""
    root, paths, _ = find_files(a.data)
    pairs = {False: [], True: []}
    for path, raw in read_texts(paths, []):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        pairs[held_out(rel)] += [json.dumps(dict(prompt=p, response=r, source=f"{rel}:{line}")) + "\n"
                                 for p, r, line in documented_functions(raw) if 1 + len(encode(p + r)) <= a.seq_len]
    if not pairs[False]:
        die(f"--data {a.data or root}: no documented function fits --seq-len {a.seq_len}; raise --seq-len or point "
            "--data at Python source")
    val = held_out_file(a.make_sft)
    try:
        for path, lines in ((a.make_sft, pairs[False]), (val, pairs[True])):
            if lines:
                atomic_write(path, lambda p: Path(p).write_text("".join(lines), encoding="utf-8"))
    except OSError as e:
        die(f"--make-sft {a.make_sft}: cannot write it ({e.strerror}); choose a writable path")
    print(f"{len(pairs[False]):,} pairs in {a.make_sft}, " + (f"{len(pairs[True]):,} held-out pairs in {val}" if
          pairs[True] else "none held out (too few files; --sft holds out 2.5% of its samples)")
          + f": documented functions of {root} that fit --seq-len {a.seq_len}")


# ----------------------------------------------------------------------------------------------
# The run's files: resume point, metrics.jsonl, progress bar, checkpoints, failures
class Run:
    """What the loop reads back and writes out. Rank 0 alone logs and saves; every rank resumes."""

    def __init__(self, a, margs, model, optimizer, param_names, train_docs, val_docs, rank, world):
        self.a, self.model, self.optimizer, self.lead, self.world = a, model, optimizer, rank == 0, world
        self.data = dict(files=len(train_docs), bytes=sum(map(len, train_docs)))
        state = load_checkpoint(a.out, model, optimizer, param_names) if a.resume else dict(step=0, epoch=0, batch=0)
        if a.resume and state.get("data") != self.data:
            self.say(f"warning: the training data changed since the checkpoint ({state.get('data')} -> {self.data}); "
                     "resume is not exact")
        threads = torch.get_num_threads()  # CPU sums split by thread: another count rounds them otherwise
        if a.resume and a.device.type == "cpu" and state.get("threads", threads) != threads:
            self.say(f"warning: the run used {state['threads']} CPU threads and this resume {threads}, so it is not "
                     f"bit-exact; set OMP_NUM_THREADS={state['threads']} for an exact resume")
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.tokens = tokens_before(self.step, a)  # what the batch-size ramp has reached
        self.saved_step = self.step if a.resume else None
        self.stop, self.tokens_per_step = min(a.stop_at or a.max_steps, a.max_steps), a.batch_size * a.seq_len * a.grad_accum
        ramp = (f"{a.batch_start * a.seq_len:,} -> " if a.batch_ramp else "") + f"{self.tokens_per_step:,} tokens/step" \
            + (f" over the first {human(a.batch_ramp)} tokens" if a.batch_ramp else "")
        args = {k: v for k, v in vars(a).items() if k not in NOT_SAVED}  # what the checkpoint carries
        self.state = dict(seed=a.seed, args=args, schedule={k: args[k] for k in (
            "max_steps", "warmup_steps", "decay_start", "lr", "min_lr_frac", "mtp_weight", "mtp_weight_late")},
            data=self.data, model=margs.to_dict(), param_names=param_names, threads=threads)
        self.metrics = self.open_metrics(kept_metrics(os.path.join(a.out, "metrics.jsonl"), self.step) if a.resume else [])
        self.say(f"{a.preset or a.init_from}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on "
                 f"{a.device} ({a.dtype}); {len(train_docs)} train / {len(val_docs)} val {'samples' if a.sft else 'files'}, "
                 f"{self.data['bytes'] / 1e6:.2f}M / {sum(map(len, val_docs)) / 1e6:.2f}M bytes; {ramp}; steps "
                 f"{self.step} -> {self.stop}" + (f"; {world} data-parallel ranks" if world > 1 else "")
                 + f"; first checkpoint at step {min(self.stop, (self.step // a.save_interval + 1) * a.save_interval)}")
        self.times = []

    def say(self, *args, **kw):  # results and warnings: stdout
        if self.lead:
            print(*args, **kw)

    def tell(self, line):  # what stopped the run: stderr
        if self.lead:
            tell(line)

    def open_metrics(self, kept):
        """metrics.jsonl as of the checkpoint (lines logged after it dropped), open for appending."""
        if not self.lead:
            return None
        path = os.path.join(self.a.out, "metrics.jsonl")
        try:
            atomic_write(path, lambda p: Path(p).write_text("".join(kept)))
        except OSError as e:
            die(f"--out {self.a.out}: cannot write metrics.jsonl ({e.strerror}); free space or fix the folder's permissions")
        return open(path, "a")

    def log(self, step, logs, batches):
        """After each step: the metrics line (and the validation line), the progress bar, and every
        --save-interval steps and at the end the checkpoint."""
        self.step, step_tokens = step, logs["batch_size"] * self.a.seq_len
        self.tokens += step_tokens
        self.times.append((logs["seconds"], step_tokens))
        rec = dict(step=step, **{k: logs[k] for k in ("loss", "ce", "mtp_loss", "balance_loss", "lr", "mtp_weight",
                                                      "grad_norm")}, tokens_per_s=step_tokens / logs["seconds"],
                   maxvio_mean=logs["maxvio_mean"], maxvio_max=logs["maxvio_max"], epoch=batches.epoch,
                   batch_size=logs["batch_size"], tokens=self.tokens)
        if "val_loss" in logs:
            rec.update(val_loss=logs["val_loss"], val_bpb=logs["val_loss"] / math.log(2))
            self.pbar.write(f"step {step}: val loss {rec['val_loss']:.4f} nats/byte, {rec['val_bpb']:.4f} bits/byte",
                            file=sys.stdout)  # a result: stdout, while the bar is on stderr
        self.last = rec
        if self.lead:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
            self.pbar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", lr=f"{rec['lr']:.2e}",
                                  maxvio=f"{rec['maxvio_max']:.2f}")
            self.pbar.update()
            if step % self.a.save_interval == 0 or step == self.stop:
                self.save(step, batches)
        self.stop_if_asked(step, batches)

    def save(self, step, batches):
        save_checkpoint(self.a.out, self.model, self.optimizer,
                        dict(step=step, epoch=batches.epoch, batch=batches.index, **self.state, metrics=self.last))
        self.saved_step = step

    def stop_if_asked(self, step, batches):
        """After each step: a SIGTERM or SIGHUP (a scheduler preempting the job), or a stdout or
        stderr that can no longer be written, stops the run here with a checkpoint of this step, so
        that it loses nothing. The ranks agree first (the largest exit status of any rank), so that
        all stop after the same step, and wait for rank 0's save before they exit."""
        failed = stream_failure()
        status = 128 + self.signum if self.signum else stream_status(failed[1]) if failed else 0
        status = all_max(status, self.world, self.a.device)
        if not status:
            return
        if self.lead and self.saved_step != step:
            self.save(step, batches)
        self.pbar.close()
        signum = status - 128 if status - 128 in TERMINATE else None
        why = (f"terminated by {signal.Signals(signum).name}" if signum else
               f"error: {stream_problem(*failed)}" if failed else "error: another rank cannot write its output")
        self.tell(f"{why} after step {step}: stopped, {self.on_disk()}; continue with --resume")
        if self.world > 1:  # every rank waits for rank 0's save; then out as leave_distributed does
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(status)
        sys.exit(status)

    def on_disk(self):
        return (f"{self.a.out}/ keeps the checkpoint of step {self.saved_step}" if self.saved_step is not None
                else "no checkpoint written")

    def again(self):
        return "continue with --resume" if self.saved_step is not None else "run the same command again"

    @contextlib.contextmanager
    def progress(self):
        """Around the loop: its progress bar (on stderr, and only where stderr is a terminal), SIGTERM
        and SIGHUP held until the step ends (stop_if_asked; a repeat changes nothing: torchrun
        forwards the scheduler's SIGTERM to ranks that may have had it already; Ctrl-C stops at
        once), and the loop's failures as one line each, with what the checkpoint on disk holds."""
        self.pbar = tqdm(total=self.stop, initial=self.step, file=sys.stderr, dynamic_ncols=True,
                         disable=True if not self.lead else None)  # None: off where stderr is not a terminal
        self.signum = None

        def hold(signum, frame):
            self.signum = self.signum or signum
        held = {s: signal.signal(s, hold) for s in TERMINATE}
        try:
            yield
        except KeyboardInterrupt as e:
            self.pbar.close()
            what, status = interruption(e)
            self.tell(f"{what} at step {self.step}, {self.on_disk()}; {self.again()}")
            sys.exit(status)
        except NotFinite as e:
            self.pbar.close()
            die(f"{e} at step {self.step + 1}; stopped, {self.on_disk()}; lower --lr or use --dtype float32")
        except (OSError, SafetensorError) as e:  # only writes do I/O in the loop: disk full, a file-size limit, permissions
            self.pbar.close()
            die(f"cannot write to {self.a.out}/ at step {self.step} ({getattr(e, 'strerror', None) or one_line(e)}); "
                f"{self.on_disk()}; free space or fix permissions, then {self.again()}")
        finally:
            for s, handler in held.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def finish(self):
        self.pbar.close()
        if self.lead:
            steady = self.times[1:] or self.times  # the first step pays for warm-up (and compilation)
            seconds, tokens = (sum(x) for x in zip(*steady))
            print(f"step {self.step}: val loss {self.last['val_loss']:.4f} nats/byte = {self.last['val_bpb']:.4f} "
                  f"bits/byte, {tokens / seconds:,.0f} tokens/s; checkpoint in {self.a.out}/")


def claim_out(a):
    """Hold --out's lock for the run (flock: the OS drops it when the process ends, even by kill -9),
    so that a second run on the same folder stops instead of interleaving checkpoints. Under it:
    delete the temporary files of killed writers, and refuse to start afresh over another run's
    checkpoint unless --overwrite (which deletes that checkpoint and its metrics first, so that a
    kill before the first save cannot leave the old checkpoint beside the new run's metrics).
    -> the open lock file (closing it releases the lock); under torchrun rank 0 alone takes it."""
    if launch_env()[0]:
        return contextlib.nullcontext()
    try:
        lock = open(os.path.join(a.out, ".lock"), "a")
    except OSError as e:
        die(f"--out {a.out}: cannot open {a.out}/.lock ({e.strerror}); remove what is there or choose another --out")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        if not isinstance(e, BlockingIOError):  # e.g. a file system without locks
            die(f"--out {a.out}: cannot lock {a.out}/.lock ({e.strerror}); choose an --out on a local disk")
        die(f"--out {a.out}: another run is using it (it holds {a.out}/.lock); wait for it to end or choose another --out")
    remove_stale_temporaries(a.out)
    if not a.resume and os.path.lexists(os.path.join(a.out, "train_state.safetensors")):
        if not a.overwrite:
            lock.close()
            die(f"--out {a.out} holds the checkpoint of another run; continue it with --resume, choose another "
                "--out, or pass --overwrite to replace it")
        for name in ("train_state.safetensors", "train_state.json", "metrics.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(a.out, name))
    return lock


# ----------------------------------------------------------------------------------------------
# Dry run: accounting from the shapes alone
# The report's cost (DeepSeek-V3 technical report, §1 and Table 1): 180K H800 GPU hours per
# trillion training tokens. The peaks it is held against are NVIDIA's dense (no sparsity) H800
# SXM figures, the same as H100 SXM: ~989 TFLOP/s BF16, ~1979 TFLOP/s FP8.
GPU_HOURS_PER_TRILLION_TOKENS = 180e3
H800_PEAK = {"BF16": 989e12, "FP8": 1979e12}
GPU_BYTES = 81559 * 2**20  # an "80 GB" H100/H800/A100 as torch reports it (79.6 GiB)
GPU_RESERVE = 2 * 2**30    # the CUDA context, cuBLAS workspaces and allocator fragmentation


def dry_run(a, margs, sft=None):
    """Accounting from the shapes alone, so even the 671B preset costs nothing to inspect."""
    acc = accounting(margs, a.seq_len)
    flops, kv, tokens = acc["flops_per_token"], acc["kv_bytes_per_token"], a.batch_size * a.seq_len * a.grad_accum
    n = acc["params_total"] + acc["params_mtp"]  # training holds the MTP modules too
    print(f"preset {a.preset} at seq_len {a.seq_len}" if a.preset else
          f"checkpoint {a.init_from} (its architecture) at seq_len {a.seq_len}")
    print(f"parameters  {human(acc['params_total'])} main model ({human(acc['params_active'])} active per token, "
          f"{human(acc['params_embedding'])} embedding) + {human(acc['params_mtp'])} MTP")
    print(f"compute     {flops:.4g} training FLOPs per token (6 x active params + attention)")
    if a.preset == "deepseek-v3":  # what the report's 180K GPU hours per trillion tokens imply
        sustained = flops * 1e12 / (GPU_HOURS_PER_TRILLION_TOKENS * 3600)
        print(f"report cost {GPU_HOURS_PER_TRILLION_TOKENS / 1e3:.0f}K H800 GPU hours per 1T tokens "
              f"({GPU_HOURS_PER_TRILLION_TOKENS * 14.8 / 1e6:.3f}M for 14.8T) -> {sustained / 1e12:.0f} TFLOP/s "
              f"sustained per GPU = " + ", ".join(f"{sustained / peak:.1%} of {kind} dense peak ({peak / 1e12:.0f})"
                                                  for kind, peak in H800_PEAK.items()))
    print(f"KV cache    {kv:,} bytes per token (bf16, the MTP layers included), "
          f"{human_bytes(kv * a.seq_len)} per {a.seq_len}-token sequence")
    print(f"memory      weights + grads + AdamW moments = total, {human(n)} parameters")
    for name, b in (("float32", 4), ("bfloat16", 2)):
        w, m = human_bytes(n * b), human_bytes(2 * n * b)
        print(f"  {name:<9} {w} + {w} + {m} = {human_bytes(4 * n * b)}")
    # one micro-batch on a CUDA GPU: its expert back-ends run exactly the N*K routed rows (grouped
    # GEMM under bf16 autocast; float32 and --fp8 keep float32 activations, one product per expert)
    autocast = a.dtype == "bfloat16" and not a.fp8
    mem = training_memory(margs, a.batch_size, a.seq_len, autocast, "fused", 1.0, a.grad_accum)
    precision = "--fp8 (float32 activations)" if a.fp8 else "bf16 autocast" if autocast else "float32"
    print(f"activations {human_bytes(mem['activations total'])} per micro-batch of {a.batch_size} x {a.seq_len}, "
          f"{precision}, on a CUDA GPU (fused attention; "
          + ("grouped experts)" if autocast else "experts on their own rows)"))
    print("  " + ", ".join(f"{k} {human_bytes(mem[k])}" for k in
                           ("attention", "dense FFN", "MoE", "MTP module", "head and logits")))
    fits = mem["peak"] <= GPU_BYTES - GPU_RESERVE
    print(f"peak        {human_bytes(mem['peak'])} = weights {human_bytes(mem['weights'])} + AdamW "
          f"{human_bytes(mem['AdamW moments'])} + " + (f"bf16 weight copies {human_bytes(mem['bf16 weight copies'])} + "
                                                        if autocast else "")
          + f"activations + logits gradient {human_bytes(mem['logits gradient'])}"
          + (f" + gradients {human_bytes(mem['gradients'])} (--grad-accum {a.grad_accum})" if a.grad_accum > 1 else "")
          + f"; {'fits' if fits else 'does NOT fit'} an 80 GB GPU ({human_bytes(GPU_BYTES)}, "
          f"{human_bytes(GPU_RESERVE)} kept for the CUDA context)")
    if a.preset == "deepseek-v3":  # what the lines above size, since no one device could run it
        print(f"            (one device holding the whole model and a micro-batch of {a.batch_size} x {a.seq_len}: a "
              "bound, not a plan; the report spreads both over 2048 H800s with 16-way pipeline, 64-way expert and "
              "ZeRO-1 data parallelism, §3.1-3.2)")
    dry_run_stages(a, margs, sft)
    total = tokens_before(a.max_steps, a)
    print(f"this run    " + (f"{a.batch_start * a.seq_len:,} -> " if a.batch_ramp else "") + f"{tokens:,} tokens/step "
          f"x {a.max_steps} steps = {human(total)} tokens, {flops * total:.3g} FLOPs")
    return mem


def ramp_steps(a):
    """The steps micro_batches() gives fewer than --grad-accum micro-batches, level by level: k
    micro-batches until the tokens reach ceil((k + 1 - first) / (grad_accum - first) x ramp)."""
    first, steps, tokens = a.batch_start // a.batch_size, 0, 0
    for k in range(first, a.grad_accum):
        until = -(-(k + 1 - first) * a.batch_ramp // (a.grad_accum - first))
        n = max(0, -(-(until - tokens) // (k * a.batch_size * a.seq_len)))
        steps, tokens = steps + n, tokens + n * k * a.batch_size * a.seq_len
    return steps


def dry_run_stages(a, margs, sft):
    """The batch-size ramp (§4.2), YaRN (§4.3) and SFT (§5.1) of this run, where it has them."""
    if a.batch_ramp:
        print(f"batch ramp  {a.batch_start:,} -> {a.batch_size * a.grad_accum:,} sequences a step over the first "
              f"{human(a.batch_ramp)} tokens, in whole micro-batches of {a.batch_size:,} (§4.2); the full size "
              f"from step {ramp_steps(a) + 1:,}")
    if margs.rope_factor > 1:
        m = 0.1 * margs.mscale_all_dim * math.log(margs.rope_factor) + 1
        print(f"YaRN        factor {margs.rope_factor:g} over the {margs.original_seq_len:,} positions trained at: "
              f"RoPE table {margs.max_seq_len:,}, beta {margs.beta_fast}/{margs.beta_slow}, sqrt(t) = 0.1 ln s + 1 "
              f"= {m:.4f} (§4.3)")
    if sft:
        x, y, _ = pack_samples(sft[0], a.seq_len)
        print(f"SFT         {len(sft[0]):,} samples ({len(sft[1]):,} held out) -> {len(x):,} rows of {a.seq_len} a "
              f"epoch, {float((y >= 0).float().mean()):.1%} of the positions response targets; sample mask "
              f"{'OFF (ablation)' if a.no_sample_mask else 'on'}; {a.max_steps} steps; LR {a.lr:.3g} cosine to "
              f"{a.lr * a.min_lr_frac:.3g} (§5.1)")


def human(x, k=1000, units=("", "K", "M", "B", "T")):
    for unit in units[:-1]:
        if abs(x) < k:
            return f"{x:.4g}{unit}"
        x /= k
    return f"{x:.4g}{units[-1]}"


def human_bytes(b):
    return human(b, 1024, (" B", " KiB", " MiB", " GiB", " TiB"))


# ----------------------------------------------------------------------------------------------
# main
def main(argv=None):
    a, margs = parse_args(argv)
    if a.make_sft:
        return make_sft(a)
    sft = load_sft(a) if a.sft else None  # read and checked before anything is written
    if a.dry_run:
        return dry_run(a, margs, sft)
    launch_env()  # a leftover RANK or a partial torchrun environment: refused before anything
    if a.seq_len > margs.max_seq_len:
        die(f"--seq-len {a.seq_len} exceeds the model's max_seq_len {margs.max_seq_len}; lower --seq-len"
            + (" or extend the context with --rope-factor" if a.init_from else ""))
    find_files(a.data)  # inputs before outputs: a missing --data is the error, not out/'s checkpoint
    init = init_weights(a, margs) if a.init_from and not a.resume else None
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        die(f"--out {a.out}: cannot write there ({e.strerror}); choose a writable folder with --out")
    with claim_out(a):  # held for the whole run
        return train(a, margs, init, sft)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C raises KeyboardInterrupt,
    for s in TERMINATE:                                       # SIGTERM and SIGHUP Terminated (the loop holds them)
        signal.signal(s, raise_terminated)
    guard_streams()  # a closed or full stdout/stderr never stops training (Run.stop_if_asked saves first)
    try:
        main()
    except KeyboardInterrupt as e:  # during start-up or the final sample; the training loop reports its own
        what, status = interruption(e)
        tell(f"error: {what}; the checkpoint in --out is as its last save left it")
        sys.exit(status)
    exit_if_streams_failed()
