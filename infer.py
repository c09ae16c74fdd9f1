"""
Generate text with a DeepSeek-V3 checkpoint: a prompt or a fill-in-the-middle, streamed as it is
written, then one line of speed; or a benchmark of MTP speculative decoding against plain decoding.

    python infer.py                                        # complete a Python function with out/
    python infer.py --prompt "import os" --temperature 0   # greedy
    python infer.py --prompt-file notes.txt --top-k 50 --seed 3
    python infer.py --fim-prefix $'def add(a, b):\\n    ' --fim-suffix $'\\n\\nprint(add(1, 2))\\n'   # bash
    python infer.py --speculative                          # MTP drafts, the main model verifies (§2.2)
    python infer.py --bench                                # plain vs speculative greedy: tokens/s, acceptance
    python infer.py --bench --compile                      # the same with compiled static-shape decode steps
    python infer.py --ckpt path/to/DeepSeek-V3 --dtype fp8 --prompt "Hello"   # published layout
    torchrun --nproc-per-node 8 infer.py --ckpt path/to/DeepSeek-V3 --dtype fp8 --prompt-ids 0,100
        # tensor parallel attention/FFN + expert parallel MoE, one rank per GPU
    python infer.py --ckpt deepseek-v3 --dtype fp8 --dry-run 8   # memory per GPU over 8 GPUs
    python infer.py --eval code                            # multiple choice by likelihood (§4.4.1), built-in task
    python infer.py --eval hellaswag_val.jsonl --eval-out scores.jsonl   # HellaSwag's own file
    torchrun --nproc-per-node 4 infer.py --redundant-experts 2   # copies of the 2 hottest experts a layer (§3.4)

Checkpoints are folders in the published Hugging Face layout (config.json + *.safetensors), as
`python train.py` writes to out/. Text goes through our byte tokenizer (train.py), or through the
folder's tokenizer.json when there is one (needs `pip install tokenizers`), with its FIM tokens
and the begin and end tokens that tokenizer_config.json, generation_config.json or config.json
name; generation ends at the end token (ours: <|endoftext|>). --prompt-ids takes token ids and
works with any checkpoint. The text goes to stdout, the speed line to stderr. --eval prints acc and
acc_norm, the last line `acc=A acc_norm=B n=N`.

Part 1, the recipe:
    prompt_ids ........... text, token ids, or a fill-in-the-middle prompt in PSM order (§4.1)
    complete ............. the generation call, streamed as it is written (Printer), timed
    bench ................ plain vs MTP speculative greedy decoding (§2.2): tokens/s, acceptance
    score_batch .......... perplexity-based multiple choice (§4.4.1): each choice's log-likelihood,
                           the context run once; choice_scores, accuracy (acc, acc_norm, standard
                           errors), code_task (the built-in --eval code)
Part 2, the harness: command line, checkpoint and tokenizer loading (model.py reads the files),
--eval's files, redundant experts (§3.4; model.py places them), reports, dry run (model.py
counts the bytes), main.
"""
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def exit_quietly_on_signals():
    """Ctrl-C, SIGTERM or SIGHUP while torch loads: one line, no traceback, exit 128 + the signal's
    number (until __main__ installs KeyboardInterrupt and Terminated). train.py's twin: it must run
    before `import torch`, and importing train.py imports torch."""
    def leave(signum, frame):
        with contextlib.suppress(OSError):
            os.write(2, f"error: {'interrupted' if signum == signal.SIGINT else 'terminated'} while starting\n".encode())
        os._exit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, leave)


if __name__ == "__main__":
    exit_quietly_on_signals()

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from model import (FIM_NAMES, PRESETS, CheckpointError, ModelArgs, Transformer, atomic_write, decode_step,
                   expert_load, kv_bytes_per_token, read_file, redundant_placement, reset_expert_load, setup_cache,
                   tokenizer_ids, weight_bytes_per_rank)
from train import (EOT, FIM_BEGIN, FIM_END, FIM_HOLE, TERMINATE, Parser, StreamFailed, count, decode, die, encode,
                   exit_if_streams_failed, fim_prompt, guard_streams, human_bytes, init_distributed, interruption,
                   leave_distributed, load_documents, nonneg, number, one_line, pick_device, positive_int,
                   raise_terminated, seed_number, thread_count)


# ==============================================================================================
# Part 1: the recipe
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Prompts: text, token ids, or a fill-in-the-middle (§4.1, PSM: begin prefix hole suffix end)

DEFAULT_PROMPT = "def fibonacci(n):\n"


def prompt_ids(a, vocab, vocab_size):
    """-> (ids, text to echo): given ids, a FIM prompt in PSM order (echo the text before the
    hole), or text; the begin token first where the tokenizer's config asks for it."""
    if a.prompt_ids is not None:
        ids = given_ids(a.prompt_ids, vocab_size)
        return ids, vocab.decode(ids) if vocab.decode else ""
    if vocab.encode is None:
        die(vocab.why)
    start = [] if vocab.bos is None else [vocab.bos]
    if a.fim:
        if vocab.fim is None:
            die(f"--fim-prefix/--fim-suffix: the tokenizer of {a.ckpt} has no FIM tokens "
                f"({', '.join(FIM_NAMES[0])}); complete a --prompt instead")
        return start + fim_prompt(a.fim_prefix or "", a.fim_suffix or "", vocab.plain, vocab.fim), a.fim_prefix or ""
    text = prompt_text(a)
    return encode_text(vocab, text), text


# ----------------------------------------------------------------------------------------------
# Generation, streamed as it is written

class Printer:
    """Streams generated text. Each call decodes the ids since the last clean cut and prints what
    is new, holding back a trailing U+FFFD: the bytes of one character can arrive in different
    steps (the usual incremental detokenization; decoding from one token back keeps the
    spaces that some tokenizers attach to a token's start)."""

    def __init__(self, decode):
        self.decode, self.start, self.read, self.last = decode, 0, 0, "\n"

    def write(self, text):
        if text:
            print(text, end="", flush=True)
            self.last = text[-1]

    def __call__(self, ids, final=False):
        seen, text = self.decode(ids[self.start:self.read]), self.decode(ids[self.start:])
        if len(text) > len(seen) and (final or not text.endswith("\ufffd")):
            self.write(text[len(seen):])
            self.start, self.read = self.read, len(ids)


@torch.inference_mode()
def timed_generate(model, ids, a, max_new_tokens, temperature, speculative, show=None, end=()):
    """-> (new ids, prefill seconds, decode seconds, stats). Generation stops after max_new_tokens
    or at the first token in `end`, the last new id then (show() sees the ids before it). The
    prefill ends at generate's first callback (the prompt's forward and the first new token);
    the decode is the rest."""
    marks, stats, T0 = [], {}, len(ids)
    end_ids = torch.tensor(end, dtype=torch.long, device=a.device)

    def first_end(new):  # new ids (n,) -> the index of the first end token, or n
        hit = torch.isin(new, end_ids).nonzero()
        return int(hit[0]) if len(hit) else len(new)

    def callback(out, lengths):
        if not marks:
            synchronize(a.device)
            marks.append(time.perf_counter())
        if show is not None:
            new = out[0, T0:int(lengths[0])]
            show(new[:first_end(new)].tolist())

    tokens = torch.tensor([ids], device=a.device)
    synchronize(a.device)
    t0 = time.perf_counter()
    new = model.generate(tokens, max_new_tokens, temperature, a.top_p, speculative=speculative, top_k=a.top_k,
                         callback=callback, stats=stats, compile=a.compile, stop_tokens=end)[0, T0:]
    synchronize(a.device)
    new = new[:first_end(new) + 1].tolist()  # through the end token, if any
    return new, marks[0] - t0, time.perf_counter() - marks[0], stats


def complete(model, ids, echo, vocab, a):
    """Print the prompt's text, then the new text as it is written (after a FIM middle, the text
    after the hole) -> the speed line's fields."""
    printer = Printer(vocab.decode or (lambda ids: ",".join(map(str, ids))))
    printer.write(echo)
    new, prefill_s, decode_s, stats = timed_generate(model, ids, a, a.max_new_tokens, a.temperature,
                                                     a.speculative, show=printer, end=vocab.end)
    printer(new[:-1] if new[-1] in vocab.end else new, final=True)
    if a.fim:
        printer.write(a.fim_suffix or "")
    if printer.last != "\n":
        printer.write("\n")
    line = [f"prompt {len(ids)} tokens", f"new {len(new)} tokens", f"prefill {rate(len(ids), prefill_s)}",
            f"decode {rate(len(new) - 1, decode_s)}"]
    return line + ([f"MTP acceptance {acceptance(stats)}"] if a.speculative else [])


# ----------------------------------------------------------------------------------------------
# The benchmark: plain against MTP speculative greedy decoding (§2.2), the same tokens expected

def bench(model, ids, a):
    """Plain and speculative greedy decoding of the same prompt after one short warm-up each (which
    compiles, with --compile: the cache has its final size first, so the timed runs reuse the graphs)."""
    setup_cache(model, 1, len(ids) + a.max_new_tokens + 1)
    t0 = time.perf_counter()
    for spec in (False, True):
        timed_generate(model, ids, a, min(a.max_new_tokens, 16), 0.0, spec)
    warmup = time.perf_counter() - t0
    runs, speed = {}, {}
    for _ in range(3):  # alternate the two, keep the median of 3 (machines drift between runs)
        for name, spec in (("plain", False), ("speculative", True)):
            runs[name] = timed_generate(model, ids, a, a.max_new_tokens, 0.0, spec)
            speed.setdefault(name, []).append((a.max_new_tokens - 1) / runs[name][2])
    speed = {name: sorted(s)[1] for name, s in speed.items()}
    print_bench(ids, a, warmup, runs, speed)


# ----------------------------------------------------------------------------------------------
# Perplexity-based multiple choice (§4.4.1): the report scores its base model on HellaSwag, PIQA,
# WinoGrande, RACE, MMLU, ARC, C-Eval, CMMLU... by the likelihood of each answer choice given the
# context, the most likely choice taken as the answer.

@dataclass
class Item:
    """One question, tokenized: the context's ids, each choice's ids (its continuation of the
    context), each choice's length in bytes of text, and the index of the right choice."""
    context: list
    choices: list
    nbytes: list
    label: int


def encode_text(vocab, text):
    """text -> ids, the begin token first where the tokenizer's config asks for it."""
    start = [] if vocab.bos is None else [vocab.bos]
    ids = vocab.encode(text)
    return ids if ids[:len(start)] == start else start + ids


def item_ids(vocab, context, choices, label):
    """Text -> Item, split as lm-evaluation-harness splits it: the context's trailing whitespace
    moves to the front of every choice (BPE tokenizers join a space to the word after it); a
    choice's ids are those of context + choice after the context's own ids. A context of no
    tokens gets the end-of-text token before it (the harness's prefix token: what precedes
    every document in training)."""
    space = context[len(context.rstrip()):]
    context = context[:len(context) - len(space)]
    prefix = [] if encode_text(vocab, context) else list(vocab.end[:1])
    ids = prefix + encode_text(vocab, context)
    conts = [(prefix + encode_text(vocab, context + space + c))[len(ids):] for c in choices]
    return Item(ids, conts, [len(c.encode("utf-8")) for c in choices], label)


@torch.inference_mode()
def score_batch(model, items):
    """The summed log-probability (nats) of each choice's tokens given its context -> (B, J)
    float64, NaN where an item has fewer than J choices. Each context runs once: a prefill of the
    contexts (right-padded; causal attention keeps the padding out of the real tokens) fills the
    latent cache, then choice j of every item is one decoding step of its M tokens at the
    positions after its context (absorbed attention, §2.1.1), which overwrites the cache past
    the context: each choice sees its context and itself only."""
    dev, B = model.embed.weight.device, len(items)
    n_ctx = torch.tensor([len(it.context) for it in items], device=dev)                 # (B,)
    C, M = int(n_ctx.max()), max(len(c) for it in items for c in it.choices)
    J = max(len(it.choices) for it in items)
    pad = lambda seqs, n: torch.tensor([s + [0] * (n - len(s)) for s in seqs], device=dev)
    setup_cache(model, B, C + M)
    h = model.trunk(pad([it.context for it in items], C), torch.arange(C, device=dev).expand(B, C))
    first = model.head(h[torch.arange(B, device=dev), n_ctx - 1])        # (B, V): predicts each choice's first token
    scores = torch.full((B, J), float("nan"), dtype=torch.float64)
    for j in range(J):
        choice = [it.choices[j] if j < len(it.choices) else [] for it in items]
        tokens, pos = pad(choice, M), n_ctx[:, None] + torch.arange(M, device=dev)    # (B, M)
        logits = decode_step(model, tokens, pos, C + M)[1]                          # (B, M, V)
        logp = torch.cat([first[:, None], logits[:, :-1]], 1).float().log_softmax(-1)
        token_logp = logp.gather(-1, tokens[..., None]).squeeze(-1).double()       # (B, M)
        real = torch.arange(M, device=dev) < torch.tensor([len(c) for c in choice], device=dev)[:, None]
        asked = torch.tensor([j < len(it.choices) for it in items])
        scores[:, j] = torch.where(asked, torch.where(real, token_logp, 0).sum(1).cpu(), float("nan"))
    return scores


def choice_scores(model, items, batch_size, progress=True):
    """Every item's choice scores (score_batch), batch_size items a forward -> a list of lists, in
    the items' order. Items go longest first (a batch that does not fit shows at once, and
    neighbours pad little); a batch stops where its longest context and longest choice would
    no longer fit the model's context together."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].context) - max(map(len, items[i].choices)))
    batches, C, M = [[]], 0, 0
    for i in order:
        c, m = len(items[i].context), max(map(len, items[i].choices))
        if batches[-1] and (len(batches[-1]) == batch_size or max(C, c) + max(M, m) > model.args.max_seq_len):
            batches.append([])
            C = M = 0
        batches[-1].append(i)
        C, M = max(C, c), max(M, m)
    out = [None] * len(items)
    with tqdm(total=len(items), unit="item", desc="eval", disable=not progress) as bar:
        for batch in batches:
            for i, row in zip(batch, score_batch(model, [items[i] for i in batch])):
                out[i] = row[:len(items[i].choices)].tolist()
            bar.update(len(batch))
    return out


def accuracy(scores, nbytes, labels):
    """acc: the share of items whose largest summed log-likelihood is the right choice's;
    acc_norm: the same with each sum divided by the choice's length in bytes (lm-evaluation-
    harness's acc_norm; its code divides by len(choice) in characters, the same for ASCII text).
    Each with the standard error of a mean of n 0/1 outcomes as the harness computes it
    (mean_stderr: the sample standard deviation, n - 1 in the denominator, over sqrt(n)), which
    is sqrt(p (1 - p) / (n - 1)). The first of tied choices wins, as numpy's argmax picks."""
    argmax = lambda v: max(range(len(v)), key=v.__getitem__)
    pred = [argmax(s) for s in scores]
    pred_norm = [argmax([x / max(b, 1) for x, b in zip(s, nb)]) for s, nb in zip(scores, nbytes)]
    n = len(labels)
    stderr = lambda p: math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    acc = sum(p == y for p, y in zip(pred, labels)) / n
    acc_norm = sum(p == y for p, y in zip(pred_norm, labels)) / n
    return dict(acc=acc, acc_stderr=stderr(acc), acc_norm=acc_norm, acc_norm_stderr=stderr(acc_norm), n=n,
                chance=sum(1 / len(s) for s in scores) / n, pred=pred, pred_norm=pred_norm)


def code_task(texts, n_items=400, n_choices=4, context_chars=176, line_chars=(8, 80), seed=0):
    """The built-in task (--eval code) -> [(context, choices, label)]: in held-out files (texts:
    train.py's validation split of the standard library, files the default model never trained
    on), a line of line_chars[0] to line_chars[1] characters (stripped; with its newline at most
    the second) after the context_chars characters before it, among n_choices lines: the true
    one and lines drawn from the other held-out files, re-indented like the true line so that
    indentation alone does not tell. Fixed seed: the same items on every run of one Python."""
    lo, hi = line_chars
    lines = [t.splitlines(keepends=True) for t in texts]
    fits = lambda line: line.endswith("\n") and lo <= len(line.strip()) and len(line) <= hi
    pool = [(f, line.strip()) for f, ls in enumerate(lines) for line in ls if fits(line)]
    asked = [(f, i) for f, ls in enumerate(lines) for i in range(1, len(ls)) if fits(ls[i])]
    rng = random.Random(seed)
    items = []
    for f, i in rng.sample(asked, min(n_items, len(asked))):
        true = lines[f][i]
        indent, seen = true[:len(true) - len(true.lstrip())], {true.strip()}
        choices = []
        while len(choices) < n_choices - 1:
            g, text = rng.choice(pool)
            if g != f and text not in seen:
                seen.add(text)
                choices.append(indent + text + "\n")
        label = rng.randrange(n_choices)
        choices.insert(label, true)
        items.append(("".join(lines[f][:i])[-context_chars:], choices, label))
    return items


# ==============================================================================================
# Part 2: the harness
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Command line, and the prompt flags' checks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
PROMPT_FILE_BYTES = 16 << 20  # 4M tokens of 4 bytes: more than the longest context config.json may name
probability = number(float, 0, 1, strict=True)


def get_parser():
    p = Parser(prog="infer.py", description="Generate with a DeepSeek-V3 checkpoint; see the docstring of infer.py for examples.")
    add = p.add_argument
    add("--ckpt", default="out", help="checkpoint folder in the published layout (default: out, what train.py writes)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"text to complete (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", help="read the text to complete from this UTF-8 file, as bytes (line ends "
                        f"kept as they are, as training reads its data), at most {PROMPT_FILE_BYTES >> 20} MiB")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 100,2,35; needs no tokenizer")
    prompt.add_argument("--eval", metavar="FILE.jsonl|code", help="perplexity-based multiple choice (§4.4.1): "
                        "score each choice by its summed log-likelihood given the context; print acc, acc_norm "
                        "(per byte of the choice, as lm-evaluation-harness) and N. One JSON object a line: "
                        '{"context", "choices", "answer"} (the choices follow the context as written) or HellaSwag\'s '
                        '{"ctx", "endings", "label"} (joined by a space, as the harness does); also read: "query" '
                        'for the context, "label" or "gold" for the answer (a 0-based index, a number or a string of '
                        "digits); a context too long for the model with its longest choice loses its start (said on "
                        "stderr). `code`: the built-in task, the true next line of held-out standard-library code "
                        "among 4")
    add("--fim-prefix", help="fill in the middle (§4.1, PSM): the text before the hole")
    add("--fim-suffix", help="fill in the middle: the text after the hole")
    add("--max-new-tokens", type=positive_int, default=256,
        help="most tokens to generate; the checkpoint's end-of-text token ends it sooner (default: 256)")
    add("--temperature", type=nonneg, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    add("--top-p", type=probability, default=0.95,
        help="nucleus sampling: keep the smallest set of tokens reaching this probability (default: 0.95)")
    add("--top-k", type=count, default=0, help="sample among the k most likely tokens, 0 = all (default: 0)")
    add("--seed", type=seed_number, default=0, help="seed of the sampler (default: 0)")
    add("--speculative", action="store_true",
        help="MTP speculative decoding (§2.2): the same greedy output, the same sampling distribution")
    add("--bench", action="store_true", help="time plain and speculative greedy decoding of the prompt "
        "(batch 1, sampling flags ignored) and check that their outputs agree")
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    add("--dtype", choices=list(DTYPES), help="weights and compute; fp8 keeps FP8 weights with bfloat16 compute "
        "(default: bfloat16 on cuda, float32 on cpu)")
    add("--compile", action="store_true", help="decode with compiled static-shape steps (torch.compile; the "
        "first tokens wait for the compiler, ~10-65 s on a CPU)")
    add("--threads", type=thread_count, help="CPU threads (default: torch's, one per core; on 2 cores, 2 "
        "threads decode the tiny model faster than 1 with --compile)")
    add("--eval-out", metavar="FILE.jsonl", help='with --eval: one line per item, {"scores": summed '
        'log-likelihoods (nats), "bytes": the choices\' lengths, "pred", "pred_norm", "label"}')
    add("--eval-batch-size", type=positive_int, default=32, help="with --eval: items per forward (default: 32)")
    add("--redundant-experts", type=count, default=0, metavar="R", help="under torchrun (§3.4, redundant experts): "
        "copy up to R of the most loaded experts of each MoE layer, by the load of the prompt's prefill, to the "
        "least loaded ranks, where a copy lowers the busiest rank; the same output, a more even load (printed "
        "per rank); with --dry-run, their memory")
    add("--dry-run", type=positive_int, nargs="?", const=1, metavar="RANKS", help="print the memory per rank of "
        "serving --ckpt (only its config.json is read; or a preset name, e.g. deepseek-v3) on RANKS ranks, load nothing")
    return p


def parse_args(argv=None):
    a = get_parser().parse_args(argv)
    fim = a.fim_prefix is not None or a.fim_suffix is not None
    if fim and (a.prompt, a.prompt_file, a.prompt_ids) != (None, None, None):
        die("--fim-prefix/--fim-suffix replace the prompt; drop --prompt, --prompt-file or --prompt-ids")
    if fim and not (a.fim_prefix or a.fim_suffix):
        die("--fim-prefix and --fim-suffix are both empty; give the text around the hole")
    a.fim = fim
    if a.eval is not None and (fim or a.bench or a.speculative):
        die("--eval scores the choices of its items; drop --fim-prefix/--fim-suffix, --bench and --speculative")
    if a.eval_out is not None and a.eval is None:
        die("--eval-out writes the scores of --eval; add --eval FILE.jsonl or drop --eval-out")
    if a.redundant_experts and a.eval is not None:
        die("--redundant-experts places copies by the load of a prompt's prefill, and --eval has no prompt; "
            "drop one of them")
    for flag in ("prompt", "fim_prefix", "fim_suffix"):  # bytes that are not UTF-8 reach Python as surrogates
        text = getattr(a, flag)
        if text is not None and any("\ud800" <= c <= "\udfff" for c in text):
            die(f"--{flag.replace('_', '-')} is not valid UTF-8 text; pass UTF-8, or the bytes as --prompt-ids")
    a.device = pick_device(a.device)
    a.dtype = a.dtype or ("bfloat16" if a.device.type == "cuda" else "float32")
    return a


def given_ids(text, vocab_size):
    """--prompt-ids -> the ids, each a token of this checkpoint."""
    try:
        ids = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        die(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 100,2,35")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        die(f"--prompt-ids: {bad[0]} is not a token id of this checkpoint (0 to {vocab_size - 1})")
    if not ids:
        die("--prompt-ids is empty; give at least one token id")
    return ids


def prompt_text(a):
    """--prompt, the text of --prompt-file (read as bytes, checked as every file infer.py reads is,
    then UTF-8 without newline translation), or DEFAULT_PROMPT; never empty."""
    text = a.prompt if a.prompt is not None else DEFAULT_PROMPT
    if a.prompt_file is not None:
        try:
            text = read_file(a.prompt_file, PROMPT_FILE_BYTES, fix="give a UTF-8 text file").decode("utf-8")
        except CheckpointError as e:
            die(f"--prompt-file: {one_line(e)}")
        except UnicodeDecodeError as e:
            die(f"--prompt-file {a.prompt_file}: not UTF-8 text (byte {e.start}); convert it, or pass the ids as --prompt-ids")
    if not text:
        die("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


def check_ids(ids, vocab_size, a):
    """The prompt's ids against the model, whatever made them: a tokenizer.json can encode a text
    to nothing, or be another model's and give ids beyond this vocabulary."""
    if not ids:
        die(f"the prompt encodes to no tokens with the tokenizer of {a.ckpt}; give other text, or ids with --prompt-ids")
    if (bad := next((i for i in ids if not 0 <= i < vocab_size), None)) is not None:
        die(f"the tokenizer of {a.ckpt} gives token id {bad}, outside the model's vocabulary (0 to {vocab_size - 1}): "
            f"it is another model's; replace {os.path.join(a.ckpt, 'tokenizer.json')} or pass --prompt-ids")


# ----------------------------------------------------------------------------------------------
# Checkpoint and tokenizer loading (model.py reads the files: CheckpointError -> one line)

BYTE_VOCAB = 260  # 256 bytes + <|endoftext|>, <|fim_begin|>, <|fim_hole|>, <|fim_end|>


def load_model(a, rank=0, world=1, placement=None):
    try:
        return Transformer.from_pretrained(a.ckpt, device=a.device, dtype=DTYPES[a.dtype], rank=rank, world_size=world,
                                           placement=placement)
    except CheckpointError as e:
        die(one_line(e))
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # e.g. a torn index or tensor data
        die(f"cannot load the checkpoint in {a.ckpt}: {one_line(e)}; "
            "re-save it or point --ckpt at another folder")


@dataclass
class Vocab:
    """A checkpoint's tokenizer and the ids that frame generated text. encode is None where only
    --prompt-ids can be used (`why` says so); end may still name where generation stops."""
    encode: Callable | None = None  # text -> ids, with what the tokenizer itself adds to a text
    decode: Callable | None = None  # ids -> text, special tokens by name
    plain: Callable | None = None   # text -> ids, nothing added: the pieces of a FIM prompt
    bos: int | None = None          # put before every prompt (tokenizer_config.json: add_bos_token)
    end: tuple = ()                 # generation stops at the first of these
    fim: tuple | None = None        # (begin, hole, end) of a PSM prompt
    why: str | None = None


BYTES = Vocab(encode, decode, encode, end=(EOT,), fim=(FIM_BEGIN, FIM_HOLE, FIM_END))  # train.py's


def load_tokenizer(ckpt, vocab_size):
    """-> Vocab: the folder's tokenizer.json with the special ids its configs name, or our byte
    tokenizer for a checkpoint of its vocabulary without one."""
    path = os.path.join(ckpt, "tokenizer.json")
    if not os.path.lexists(path):
        if vocab_size == BYTE_VOCAB:
            return BYTES
        return Vocab(end=side_ids(ckpt, None, vocab_size)[1], why=(
            f"{ckpt} has no tokenizer.json and a vocabulary of {vocab_size}, not the byte tokenizer's "
            f"{BYTE_VOCAB}; add the checkpoint's tokenizer.json or pass --prompt-ids"))
    try:  # read as config.json is: checked, bounded (a FIFO would hang the package's own read)
        text = read_file(path, fix="replace it or pass --prompt-ids").decode("utf-8")
    except CheckpointError as e:
        die(one_line(e))
    except UnicodeDecodeError:
        die(f"{path} is not UTF-8 JSON; replace it or pass --prompt-ids")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return Vocab(end=side_ids(ckpt, None, vocab_size)[1],
                     why=f"{path} needs the tokenizers package: pip install tokenizers (or pass --prompt-ids)")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the package raises plain Exceptions for malformed files
        die(f"cannot read {path}: {one_line(e)}; replace it or pass --prompt-ids")
    return Vocab(lambda text: tok.encode(text).ids, lambda ids: tok.decode(ids, skip_special_tokens=False),
                 lambda text: tok.encode(text, add_special_tokens=False).ids,
                 *side_ids(ckpt, tok.token_to_id, vocab_size))


def side_ids(ckpt, token_id, vocab_size):
    """-> (begin id or None, end ids, FIM ids or None) that the folder's side files name (model.py)."""
    try:
        return tokenizer_ids(ckpt, token_id, vocab_size)
    except CheckpointError as e:
        die(one_line(e))


# ----------------------------------------------------------------------------------------------
# --eval: the items' files and the built-in code task, checked and tokenized; the report

EVAL_FILE_BYTES = 1 << 30  # HellaSwag's validation set is 11 MB; MMLU's whole test set under 10


def read_eval(path):
    """--eval FILE -> [(context, choices, label)]: one JSON object a line, blank lines skipped."""
    try:  # a regular file of bounded size, as every file infer.py reads (model.read_file)
        lines = read_file(path, EVAL_FILE_BYTES, fix="give a JSON-lines file, or `code` for the built-in task")
        lines = lines.decode("utf-8").splitlines()
    except CheckpointError as e:
        die(f"--eval: {one_line(e)}")
    except UnicodeDecodeError as e:
        die(f"--eval {path}: not UTF-8 ({one_line(e)}); give a UTF-8 JSON-lines file")
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--eval {path} line {n}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            die(f"{where}: not JSON ({one_line(e)}); each line holds one JSON object")
        field = lambda *names: next((obj[k] for k in names if k in obj), None) if isinstance(obj, dict) else None
        context, choices, label = field("context", "ctx", "query"), field("choices", "endings"), field("answer", "label", "gold")
        if not isinstance(context, str) or choices is None or label is None:
            die(f'{where}: expected an object with a "context" string, "choices" and "answer" (or HellaSwag\'s '
                '"ctx", "endings", "label")')
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            die(f"{where}: the choices must be a list of two or more non-empty strings")
        if isinstance(label, str) and label.strip().isdecimal():
            label = int(label)
        if type(label) is not int or not 0 <= label < len(choices):
            die(f"{where}: answer {label!r} is not the index of one of its {len(choices)} choices "
                f"(0 to {len(choices) - 1})")
        items.append((context + (" " if "ctx" in obj and "endings" in obj else ""), choices, label))
    if not items:
        die(f"--eval {path} holds no items; give one JSON object a line")
    return items


def eval_items(a, vocab, max_seq_len):
    """--eval -> [Item]; a context that does not fit the model's context with its longest choice
    is cut from the left (and said on stderr), as lm-evaluation-harness cuts it."""
    if vocab.encode is None:
        die(vocab.why)
    if a.eval == "code":  # train.py's held-out files of the default data
        texts = code_task([bytes(d.to(torch.uint8).tolist()).decode("utf-8", "replace") for d in load_documents(None)[1]])
    else:
        texts = read_eval(a.eval)
    items, cut = [], 0
    for n, (context, choices, label) in enumerate(texts, 1):
        item = item_ids(vocab, context, choices, label)
        where, longest = f"--eval {a.eval} item {n}", max(map(len, item.choices))
        if not item.context:
            die(f"{where}: the context is empty and the tokenizer of {a.ckpt} has no begin or end token to "
                "put before the choices; give a context")
        if not min(map(len, item.choices)):
            die(f"{where}: a choice has no tokens of its own (the tokenizer merged it into the context); "
                "reword it")
        if longest >= max_seq_len:
            die(f"{where}: a choice of {longest} tokens leaves no room for a context in the model's "
                f"{max_seq_len}; shorten it")
        if len(item.context) + longest > max_seq_len:
            item.context, cut = item.context[len(item.context) + longest - max_seq_len:], cut + 1
        items.append(item)
    if cut:
        print(f"note: {cut} of {len(items)} contexts cut from the left to fit the model's context of "
              f"{max_seq_len} tokens with their longest choice", file=sys.stderr)
    return items


def report_eval(a, items, scores, seconds):
    """stdout: the task, acc and acc_norm with their standard errors, then `acc=A acc_norm=B n=N`
    as the last line; stderr: the speed; --eval-out: one line per item."""
    r = accuracy(scores, [it.nbytes for it in items], [it.label for it in items])
    sizes = sorted({len(it.choices) for it in items})
    per = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
    what = "code (held-out standard-library files: the true next line among 4)" if a.eval == "code" else a.eval
    print(f"{what}: {r['n']} items, {per} choices each, chance {r['chance']:.4f}")
    print(f"acc       {r['acc']:.4f} ± {r['acc_stderr']:.4f}  the choice of the largest summed log-likelihood")
    print(f"acc_norm  {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}  the largest per byte of the choice's text")
    print(f"acc={r['acc']:.4f} acc_norm={r['acc_norm']:.4f} n={r['n']}")
    read = sum(len(it.context) + sum(map(len, it.choices)) for it in items)
    again = sum(len(it.context) * (len(it.choices) - 1) for it in items)
    print(f"eval: {read:,} tokens in {seconds:.1f} s, {rate(read, seconds)} (each context once; {again:,} more "
          f"tokens if each choice ran its context again) | {peak_memory(a.device)}", file=sys.stderr)
    if a.eval_out:
        rows = [json.dumps({"scores": s, "bytes": it.nbytes, "pred": p, "pred_norm": q, "label": it.label})
                for s, it, p, q in zip(scores, items, r["pred"], r["pred_norm"])]
        try:
            atomic_write(a.eval_out, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
        except OSError as e:
            die(f"--eval-out {a.eval_out}: {e.strerror or one_line(e)}; give a writable file path")


# ----------------------------------------------------------------------------------------------
# Redundant experts (§3.4): the prompt's prefill measures the load; model.py places the copies

def prefill_load(model, ids, a):
    """Run the prompt's prefill as generation runs it (with the MTP module's when it drafts) ->
    the (token, expert) pairs it routes, per expert and per rank (model.py's expert_load)."""
    reset_expert_load(model)
    model.generate(torch.tensor([ids], device=a.device), 1, speculative=a.speculative or a.bench)
    return expert_load(model)


def print_expert_load(load, what, n_redundant):
    """One line: each rank's routed pairs summed over the MoE layers, and max/mean = the sum over
    the layers of the busiest rank's pairs / the sum of the ranks' mean (each layer waits for
    its busiest rank; 1 is perfect), with every pair on its expert's home rank and with the copies."""
    def show(per_rank):  # (L, n)
        mean = per_rank.double().mean(1).sum()
        ratio = f"{per_rank.max(1).values.sum() / mean:.3f}" if mean > 0 else "n/a"
        return f"{' '.join(map(str, per_rank.sum(0).tolist()))} (max/mean {ratio})"
    _, placed, home = load
    ran = home.sum(1) > 0  # the MTP layer runs only when it drafts
    placed, home = placed[ran], home[ran]
    print(f"expert load, {what}: routed (token, expert) pairs per rank over the {len(home)} MoE layer"
          f"{'s' * (len(home) != 1)} that ran: without "
          f"replicas {show(home)}; with {n_redundant} redundant expert{'s' * (n_redundant != 1)} per layer "
          f"{show(placed)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Reports: device timing, the speed line's numbers, the benchmark's table

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(n, seconds):
    return f"{n / seconds:.1f} tokens/s" if n > 0 and seconds > 0 else "n/a"


def acceptance(stats):  # n/a where generation ended before a draft
    return f"{stats['accepted'] / stats['drafted']:.1%}" if stats.get("drafted") else "n/a"


def print_bench(ids, a, warmup, runs, speed):
    print(f"bench: {a.device} {a.dtype}, {torch.get_num_threads()} thread(s), batch 1, prompt {len(ids)} tokens, "
          f"{a.max_new_tokens} new tokens, greedy, {'compiled' if a.compile else 'eager'} "
          f"(warm-up{' and compilation' if a.compile else ''} {warmup:.1f} s), median of 3 runs")
    print(f"{'decoding':<12} {'decode tokens/s':>15} {'speedup':>8} {'MTP acceptance':>15}")
    for name, r in runs.items():
        accepted = acceptance(r[3]) if r[3] else "-"
        print(f"{name:<12} {speed[name]:>15.1f} {speed[name] / speed['plain']:>7.2f}x {accepted:>15}")
    plain, spec = runs["plain"][0], runs["speculative"][0]
    if plain == spec:
        print(f"outputs identical: yes ({len(plain)} tokens)")
    else:
        first = next(i for i, (x, y) in enumerate(zip(plain, spec)) if x != y)
        print(f"outputs identical: NO, they differ from new token {first} on (near-tied logits "
              f"in {a.dtype} can flip an argmax; in float32 this is a bug)")


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB CUDA allocated"
    try:
        import resource  # Unix only
    except ImportError:
        return "n/a"
    kib = 1 / 1024 if sys.platform == "darwin" else 1  # ru_maxrss is in bytes on macOS, KiB on Linux
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1024:,.0f} MiB peak RSS"


# ----------------------------------------------------------------------------------------------
# Dry run: the memory per rank of serving a checkpoint, from its config alone

def dry_run(a):
    """Memory per rank of serving a checkpoint over a.dry_run ranks, from its config alone (--ckpt
    a folder, its config.json or a preset); the weights as model.py's weight_bytes_per_rank counts them."""
    try:
        config = a.ckpt if os.path.isfile(a.ckpt) else os.path.join(a.ckpt, "config.json")  # a folder or its config
        args = (ModelArgs.from_preset(a.ckpt) if a.ckpt in PRESETS and not os.path.isdir(a.ckpt) else
                ModelArgs.from_hf_config(json.loads(read_file(config, fix="give a checkpoint's config"))))
    except (CheckpointError, ValueError, RecursionError) as e:
        die(f"--dry-run: cannot read the config of {a.ckpt}: {one_line(e)}; give a checkpoint "
            f"folder, its config.json or a preset ({', '.join(PRESETS)})")
    R = a.redundant_experts
    if R and a.dry_run < 2:
        die("--redundant-experts puts copies of experts on other ranks; use --dry-run 2 or more")
    if R > args.n_routed_experts:
        die(f"--redundant-experts {R} is more than the {args.n_routed_experts} routed experts of a layer of "
            f"{a.ckpt}; use at most {args.n_routed_experts}")
    try:  # fp8: FP8 projections, the rest bfloat16
        parts = weight_bytes_per_rank(args, a.dry_run, DTYPES[a.dtype], R)
    except ValueError as e:
        die(f"--dry-run {a.dry_run}: {e}")
    kv = kv_bytes_per_token(args, 4 if a.dtype == "float32" else 2)
    weights = sum(parts.values())
    print(f"{a.ckpt} on {a.dry_run} rank(s), {a.dtype} weights"
          f"{' (128x128 float32 block scales, bfloat16 for embedding, head, norms, router)' if a.dtype == 'fp8' else ''}"
          + (f", {R} redundant experts per MoE layer (at most {-(-R // a.dry_run)} on a rank)" if R else ""))
    print(f"weights per rank  {human_bytes(weights)} = "
          + " + ".join(f"{human_bytes(b)} {k}" for k, b in parts.items()))
    print(f"KV cache per rank {kv:,} bytes per token (latent + RoPE key of {args.n_layers} layers and {args.n_mtp} MTP "
          f"layer{'s' * (args.n_mtp != 1)}; "
          f"every rank holds all of it): {human_bytes(kv * args.max_seq_len)} for one {args.max_seq_len:,}-token context")
    print(f"total per rank    {human_bytes(weights + kv * args.max_seq_len)} at batch 1 and full context, activations "
          "and the CUDA context not counted")


# ----------------------------------------------------------------------------------------------
# main: load, check the prompt against the context, generate or benchmark, report

def main(argv=None):
    a = parse_args(argv)
    if a.dry_run:
        return dry_run(a)
    rank, world, a.device = init_distributed(a.device)
    if a.redundant_experts and world == 1:
        die("--redundant-experts puts copies of experts on other ranks: run under torchrun with 2 or more ranks "
            "(torchrun --nproc-per-node 2 infer.py ...), or drop it")
    if rank:  # ranks other than 0 compute silently; rank 0 prints
        sys.stdout = open(os.devnull, "w")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.compile:  # inductor notes each op its C++ wrapper calls through a fallback (FP8 experts)
        logging.getLogger("torch._inductor.ir").setLevel(logging.ERROR)
    model = load_model(a, rank, world)
    margs = model.args
    if (a.speculative or a.bench) and not margs.n_mtp:
        die(f"{'--bench' if a.bench else '--speculative'} needs an MTP module and {a.ckpt} has none "
            "(num_nextn_predict_layers is 0 or its layer is missing); drop the flag")
    if a.redundant_experts > margs.n_routed_experts:
        die(f"--redundant-experts {a.redundant_experts} is more than the {margs.n_routed_experts} routed experts of "
            f"a layer of {a.ckpt}; use at most {margs.n_routed_experts}")
    vocab = load_tokenizer(a.ckpt, margs.vocab_size)
    if a.eval is not None:
        items = eval_items(a, vocab, margs.max_seq_len)
        t0 = time.perf_counter()
        scores = choice_scores(model, items, a.eval_batch_size, progress=rank == 0)
        if rank == 0:
            report_eval(a, items, scores, time.perf_counter() - t0)
        return leave_distributed(world)
    ids, echo = prompt_ids(a, vocab, margs.vocab_size)
    check_ids(ids, margs.vocab_size, a)
    room = margs.max_seq_len - (a.speculative or a.bench) - len(ids)  # verification looks ahead one
    if room < 1:
        die(f"the prompt has {len(ids)} tokens and the context is {margs.max_seq_len}; shorten the prompt")
    if a.max_new_tokens > room:
        die(f"the prompt ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} exceed the context of "
            f"{margs.max_seq_len}; use --max-new-tokens {room} or less")
    if a.bench and a.max_new_tokens < 2:
        die("--bench times the tokens after the first; use --max-new-tokens 2 or more")
    if a.redundant_experts:  # §3.4: copies of the experts that the prompt's prefill loads most
        placement = redundant_placement(prefill_load(model, ids, a)[0], a.redundant_experts, world)
        del model
        model = load_model(a, rank, world, placement)
        load = prefill_load(model, ids, a)
        if rank == 0:
            print_expert_load(load, f"prefill of the prompt ({len(ids)} tokens)", a.redundant_experts)
        reset_expert_load(model)
    torch.manual_seed(a.seed)
    if a.bench:
        bench(model, ids, a)
    else:
        line = complete(model, ids, echo, vocab, a)
        if rank == 0:
            print(" | ".join(line + [peak_memory(a.device)]), file=sys.stderr)
    if a.redundant_experts and rank == 0:
        print_expert_load(expert_load(model), "prefill and decoding" if not a.bench else "the benchmark's runs",
                          a.redundant_experts)
    leave_distributed(world)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C raises KeyboardInterrupt again,
    for s in TERMINATE:                                       # SIGTERM and SIGHUP Terminated
        signal.signal(s, raise_terminated)
    guard_streams(fatal=True)  # a closed pipe or a full disk: StreamFailed stops the generation nobody reads
    try:
        main()
    except KeyboardInterrupt as e:
        print(file=sys.stderr)
        sys.exit(interruption(e)[1])
    except StreamFailed:
        pass  # reported below
    exit_if_streams_failed()
