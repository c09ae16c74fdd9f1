"""Tests of infer.py on a tiny random checkpoint: streaming, FIM format, speculative decoding,
--bench, and one-line errors for bad input. CPU, float32, seeded; a few seconds on 2 cores."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infer
from model import ModelArgs, Transformer
from train import encode

ROOT = Path(__file__).resolve().parent
SUMMARY = re.compile(r"prompt (\d+) tokens \| new (\d+) tokens \| prefill [\d.]+ tokens/s \| decode [\d.]+ tokens/s")
TINY = dict(n_layers=2, dim=64, inter_dim=128, n_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2,
            n_expert_groups=2, n_limited_groups=1, max_seq_len=300)


def save_tiny(path, **kw):
    torch.manual_seed(0)
    Transformer(ModelArgs.from_preset("tiny", **{**TINY, **kw})).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread, and far slower with several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "out")  # vocab 260: the byte tokenizer's


@pytest.fixture(scope="module")
def ckpt_no_mtp(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("no_mtp"), n_mtp=0)


def run_main(capsys, *argv):
    """infer.main in this process -> (exit code, stdout, stderr)."""
    try:
        infer.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_script(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, argv)], cwd=cwd, timeout=120,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------- runs
def test_no_arguments_completes_default_prompt_from_out(ckpt):
    r = run_script(cwd=Path(ckpt).parent)  # the folder holding out/
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(infer.DEFAULT_PROMPT)
    m = SUMMARY.search(r.stderr)
    assert m and int(m[1]) == len(encode(infer.DEFAULT_PROMPT)) and int(m[2]) == 256
    assert "peak RSS" in r.stderr


def test_speculative_reports_acceptance_rate(capsys, ckpt):
    code, out, err = run_main(capsys, "--ckpt", ckpt, "--speculative", "--max-new-tokens", 12, "--prompt", "x = ")
    assert code == 0 and out.startswith("x = ")
    assert SUMMARY.search(err) and re.search(r"MTP acceptance \d+\.\d%", err)


def test_greedy_speculative_prints_the_same_text_as_plain(capsys, ckpt):
    common = ["--ckpt", ckpt, "--temperature", 0, "--max-new-tokens", 40]
    plain, spec = run_main(capsys, *common), run_main(capsys, *common, "--speculative")
    assert plain[0] == spec[0] == 0 and plain[1] == spec[1]


def test_sampling_is_reproducible_with_a_seed(capsys, ckpt):
    runs = [run_main(capsys, "--ckpt", ckpt, "--seed", s, "--max-new-tokens", 30)[1] for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_bench_reports_speeds_and_identical_outputs(capsys, ckpt):
    code, out, err = run_main(capsys, "--ckpt", ckpt, "--bench", "--max-new-tokens", 24)
    assert code == 0, err
    assert re.search(r"^plain\s+[\d.]+\s+1\.00x\s+-$", out, re.M)
    assert re.search(r"^speculative\s+[\d.]+\s+[\d.]+x\s+\d+\.\d%$", out, re.M)
    assert "outputs identical: yes (24 tokens)" in out


# ------------------------------------------------------------------------------------- prompts
def test_fim_prompt_is_the_psm_format_of_training():
    a = infer.parse_args(["--fim-prefix", "def f(", "--fim-suffix", "):\n    pass\n"])
    ids, echo = infer.prompt_ids(a, encode, infer.decode, None, 260)
    assert ids == [257, *b"def f(", 258, *b"):\n    pass\n", 259]  # <|fim_begin|> P <|fim_hole|> S <|fim_end|>
    assert echo == "def f("


def test_fim_run_prints_prefix_middle_suffix(capsys, ckpt):
    code, out, err = run_main(capsys, "--ckpt", ckpt, "--fim-prefix", "a = ", "--fim-suffix", "\nb = a\n",
                              "--max-new-tokens", 8)
    assert code == 0 and out.startswith("a = ") and out.endswith("\nb = a\n")
    assert int(SUMMARY.search(err)[1]) == len("a = \nb = a\n") + 3


def test_prompt_ids_are_echoed_as_text_with_the_byte_tokenizer(capsys, ckpt):
    code, out, _ = run_main(capsys, "--ckpt", ckpt, "--prompt-ids", "104,105,256", "--max-new-tokens", 3)
    assert code == 0 and out.startswith("hi<|endoftext|>")


def test_prompt_ids_work_for_a_checkpoint_without_tokenizer(capsys, tmp_path):
    path = save_tiny(tmp_path, vocab_size=300)  # not the byte tokenizer's vocabulary
    code, out, _ = run_main(capsys, "--ckpt", path, "--prompt-ids", "1, 2,299", "--max-new-tokens", 6)
    assert code == 0 and len(out.strip().split(",")) == 6
    assert all(0 <= int(i) < 300 for i in out.strip().split(","))
    code, _, err = run_main(capsys, "--ckpt", path, "--prompt", "hi")
    assert code != 0 and "--prompt-ids" in err


def collect_prints(monkeypatch):
    shown = []
    monkeypatch.setattr("builtins.print", lambda text, **kw: shown.append(text))
    return shown


def test_stream_prints_only_whole_utf8_characters(monkeypatch):
    shown, text = collect_prints(monkeypatch), "é€🐍 ok"
    printer, ids = infer.Printer(infer.decode), encode(text)
    for n in range(1, len(ids) + 1):  # one byte per step
        printer(ids[:n])
        assert text.startswith("".join(shown)) and "\ufffd" not in "".join(shown)
    printer(ids, final=True)
    assert "".join(shown) == text


def test_stream_stops_at_endoftext(monkeypatch):
    shown, printer = collect_prints(monkeypatch), infer.Printer(infer.decode, stop=256)
    for ids in ([104], [104, 105], [104, 105, 256], [104, 105, 256, 106]):
        printer(ids)
    printer([104, 105, 256, 106, 107], final=True)
    assert "".join(shown) == "hi"


def test_checkpoint_tokenizer_json_is_used(capsys, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(["def fibonacci(n):\n    return n\n"] * 20, tokenizers.trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    path = save_tiny(tmp_path, vocab_size=tok.get_vocab_size())
    tok.save(os.path.join(path, "tokenizer.json"))
    code, out, err = run_main(capsys, "--ckpt", path, "--prompt", "def fib", "--max-new-tokens", 5)
    assert code == 0 and out.startswith("def fib")
    assert int(SUMMARY.search(err)[1]) == len(tok.encode("def fib").ids)


# ------------------------------------------------------------------------------------- errors
def one_line_error(code, out, err):
    assert code not in (0, None), "expected a non-zero exit"
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and out == ""


@pytest.fixture(scope="module")
def broken(tmp_path_factory, ckpt):
    """Folders that are not loadable checkpoints, by name."""
    root = tmp_path_factory.mktemp("broken")
    for name in ("empty", "bad_config", "bad_weights", "torn_weights", "missing_tensor", "with_tokenizer"):
        (root / name).mkdir()
    src = Path(ckpt)
    (root / "bad_config" / "config.json").write_text("{\"model_type\": \"deepseek_v3\"")
    for name in ("bad_weights", "torn_weights", "missing_tensor", "with_tokenizer"):
        (root / name / "config.json").write_text((src / "config.json").read_text())
    weights = (src / "model.safetensors").read_bytes()
    (root / "bad_weights" / "model.safetensors").write_bytes(b"not a safetensors file")
    (root / "torn_weights" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (root / "with_tokenizer" / "model.safetensors").write_bytes(weights)
    (root / "with_tokenizer" / "tokenizer.json").write_text(json.dumps({"model": {}}))
    from safetensors.torch import load_file, save_file
    tensors = load_file(src / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, root / "missing_tensor" / "model.safetensors")
    return root


@pytest.mark.parametrize("folder", ["nowhere", "empty", "bad_config", "bad_weights", "torn_weights", "missing_tensor"])
def test_unloadable_checkpoint_is_one_line_error(capsys, broken, folder):
    one_line_error(*run_main(capsys, "--ckpt", broken / folder))


@pytest.mark.parametrize("flags", [
    ["--prompt", ""],
    ["--prompt", "x" * 400],                       # longer than the context (300)
    ["--max-new-tokens", 290],                     # prompt + new tokens beyond the context
    ["--max-new-tokens", 0], ["--max-new-tokens", -5], ["--max-new-tokens", "many"],
    ["--top-p", 0], ["--top-p", 1.5], ["--temperature", -0.1], ["--top-k", -1],
    ["--prompt-ids", "1,x"], ["--prompt-ids", "1,260"], ["--prompt-ids", ""],
    ["--prompt-file", "/no/such/file.txt"], ["--bench", "--max-new-tokens", 1],
    ["--prompt", "a", "--fim-prefix", "b"], ["--fim-prefix", "", "--fim-suffix", ""],
    ["--device", "not-a-device"], ["--dtype", "int4"],
], ids=lambda f: " ".join(map(str, f))[:40])
def test_bad_input_is_one_line_error(capsys, ckpt, flags):
    one_line_error(*run_main(capsys, "--ckpt", ckpt, *flags))


def test_speculative_and_bench_without_mtp_are_one_line_errors(capsys, ckpt_no_mtp):
    for flag in ("--speculative", "--bench"):
        code, out, err = run_main(capsys, "--ckpt", ckpt_no_mtp, flag)
        one_line_error(code, out, err)
        assert "MTP" in err


def test_tokenizer_json_without_the_package_is_one_line_error(capsys, broken, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    code, out, err = run_main(capsys, "--ckpt", broken / "with_tokenizer")
    one_line_error(code, out, err)
    assert "pip install tokenizers" in err and "--prompt-ids" in err


@pytest.mark.parametrize("flags", [["--ckpt", "no/such/folder"], ["--top-p", "2"]])
def test_script_errors_have_no_traceback(flags):
    r = run_script(*flags)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
