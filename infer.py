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

Checkpoints are folders in the published Hugging Face layout (config.json + *.safetensors), as
`python train.py` writes to out/. Text goes through our byte tokenizer (train.py), or through the
folder's tokenizer.json when there is one (needs `pip install tokenizers`), with its FIM tokens
and the begin and end tokens that tokenizer_config.json, generation_config.json or config.json
name; generation ends at the end token (ours: <|endoftext|>). --prompt-ids takes token ids and
works with any checkpoint. The text goes to stdout, the speed line to stderr.

Part 1, the recipe:
    prompt_ids ........... text, token ids, or a fill-in-the-middle prompt in PSM order (§4.1)
    complete ............. the generation call, streamed as it is written (Printer), timed
    bench ................ plain vs MTP speculative greedy decoding (§2.2): tokens/s, acceptance
Part 2, the harness: command line, checkpoint and tokenizer loading (model.py reads the files),
reports, dry run (model.py counts the bytes), main.
"""
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable


def exit_quietly_on_signals():
    """Ctrl-C, SIGTERM or SIGHUP while torch loads: one line, no traceback, exit 128 + the signal's
    number (until __main__ installs KeyboardInterrupt and Terminated)."""
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

from model import (FIM_NAMES, PRESETS, CheckpointError, ModelArgs, Transformer, kv_bytes_per_token, read_file,
                   setup_cache, tokenizer_ids, weight_bytes_per_rank)
from train import (EOT, FIM_BEGIN, FIM_END, FIM_HOLE, TERMINATE, Parser, StreamFailed, count, decode, die, encode,
                   exit_if_streams_failed, fim_prompt, guard_streams, human_bytes, init_distributed, interruption,
                   leave_distributed, nonneg, number, one_line, pick_device, positive_int, raise_terminated,
                   seed_number, thread_count)


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
    ids = vocab.encode(text)
    return ids if ids[:len(start)] == start else start + ids, text


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


def load_model(a, rank=0, world=1):
    try:
        return Transformer.from_pretrained(a.ckpt, device=a.device, dtype=DTYPES[a.dtype], rank=rank, world_size=world)
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
    try:
        parts = weight_bytes_per_rank(args, a.dry_run, DTYPES[a.dtype])  # fp8: FP8 projections, the rest bfloat16
    except ValueError as e:
        die(f"--dry-run {a.dry_run}: {e}")
    kv = kv_bytes_per_token(args, 4 if a.dtype == "float32" else 2)
    weights = sum(parts.values())
    print(f"{a.ckpt} on {a.dry_run} rank(s), {a.dtype} weights"
          f"{' (128x128 float32 block scales, bfloat16 for embedding, head, norms, router)' if a.dtype == 'fp8' else ''}")
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
    vocab = load_tokenizer(a.ckpt, margs.vocab_size)
    ids, echo = prompt_ids(a, vocab, margs.vocab_size)
    check_ids(ids, margs.vocab_size, a)
    room = margs.max_seq_len - (a.speculative or a.bench) - len(ids)  # verification looks ahead one
    if room < 1:
        die(f"the prompt has {len(ids)} tokens and the context is {margs.max_seq_len}; shorten the prompt")
    if a.max_new_tokens > room:
        die(f"the prompt ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} exceed the context of "
            f"{margs.max_seq_len}; use --max-new-tokens {room} or less")
    torch.manual_seed(a.seed)
    if a.bench:
        if a.max_new_tokens < 2:
            die("--bench times the tokens after the first; use --max-new-tokens 2 or more")
        bench(model, ids, a)
        return leave_distributed(world)
    line = complete(model, ids, echo, vocab, a)
    if rank == 0:
        print(" | ".join(line + [peak_memory(a.device)]), file=sys.stderr)
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
