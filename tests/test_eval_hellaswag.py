"""HellaSwag: parsing, both scorings against a plain per-ending reference, batching, ranks,
the download cache, the CLI and the training hook."""

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig, UserError
from gpt2lab.cli import main
from gpt2lab.eval import hellaswag as hs
from gpt2lab.eval.hellaswag import HellaSwag, harness_query, load_examples, parse_example, read_examples
from gpt2lab.tokenizer import GPT2Tokenizer

BLOCK = 64

LONG = " ".join(["The crowd cheers as the runner crosses the line and waves to the stands."] * 8)
RECORDS = [
    {"activity_label": "Removing ice from car",
     "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
              "clothes smiles.",
     "ctx_b": "then",
     "endings": [", the man adds wax to the windshield and cuts it.",
                 ", a person board a ski lift, while two men supporting the head of the person wearing winter "
                 "clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."],
     "label": 3},
    {"activity_label": "Baking cookies",
     "ctx_a": "A female chef in white uniform shows a stack of baking pans in a large kitchen presenting them.",
     "ctx_b": "the pans",
     "endings": ["contain egg yolks and baking soda.", "are then sprinkled with brown sugar.",
                 "are placed in a strainer on the counter.", "are filled with pastries and loaded into the oven."],
     "label": 3},
    {"activity_label": "Home and Garden",
     "ctx_a": "[header] How to make a rock garden [title] Choose a sunny spot.",
     "ctx_b": "[step] rock plants",
     "endings": ["need sun. [substeps] Look for a place with six hours of light.",
                 "are plants that grow in rocks [title] Dig.", "like shade, so build under a tree.",
                 "[title] can be watered daily with a hose [step] Water them."],
     "label": 0},
    {"activity_label": "Playing guitar", "ctx_a": "A man is sitting on a chair holding a guitar.", "ctx_b": "he",
     "endings": ["starts playing the guitar while singing.", "puts the guitar in the oven.",
                 "eats the guitar strings one by one.", "swims across the lake."],
     "label": 0},
    # A context longer than the block: cut from the left.
    {"activity_label": "Running a marathon", "ctx_a": LONG, "ctx_b": "the runner",
     "endings": ["stops to drink water.", "sits down on the track and laughs.", "hugs his coach.", "flies away."],
     "label": 2},
    # An ending longer than the block on its own: its last block-size tokens are scored.
    {"activity_label": "Speeches", "ctx_a": "A woman walks up to the podium.", "ctx_b": "she",
     "endings": ["thanks everyone for coming.", LONG, "drops the microphone.", "reads a poem."],
     "label": 0},
    {"activity_label": "Dog walking", "ctx_a": "A dog pulls on its leash in the park.", "ctx_b": "the owner",
     "endings": ["lets go of the leash.", "throws a ball for the dog.", "", "calls the dog back and pats it."],
     "label": 1},
    {"activity_label": "Painting", "ctx_a": "Two kids are painting a fence white.", "ctx_b": "",
     "endings": ["They dip their brushes in the bucket.", "The fence turns blue.", "A cat paints too.",
                 "They eat the paint."],
     "label": "0"},
]


def write_jsonl(path: Path, records) -> Path:
    lines = []
    for record in records:
        record = dict(record)
        record.setdefault("ctx", (record["ctx_a"] + " " + record["ctx_b"]).strip())
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "hellaswag.jsonl", RECORDS)


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(block_size=BLOCK)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- the plain reference: one ending at a time, every step written out ------------------------


def plain_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def plain_ending_loglik(logits_of, context, ending, block):
    """Summed log-probability of `ending`'s tokens after `context`, and how many were scored,
    from one forward of the last block + 1 tokens."""
    window = (context + ending)[-(block + 1):]
    logprobs = F.log_softmax(logits_of(window[:-1]).double(), dim=-1)
    first_ending_target = len(window) - len(ending)
    total, scored = 0.0, 0
    for position in range(len(window) - 1):
        target_index = position + 1
        if target_index >= first_ending_target:
            total += logprobs[position, window[target_index]].item()
            scored += 1
    return total, scored


def plain_reference(logits_of, records, block):
    tokenizer = GPT2Tokenizer()
    out = []
    for record in records:
        ctx = record.get("ctx", (record["ctx_a"] + " " + record["ctx_b"]).strip())
        context = tokenizer.encode(ctx)
        completion = [plain_ending_loglik(logits_of, context, tokenizer.encode(" " + e), block) for e in record["endings"]]
        query = plain_preprocess(record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize())
        query_tokens = tokenizer.encode(query)
        harness, chars = [], []
        for ending in record["endings"]:
            choice = plain_preprocess(ending)
            whole = tokenizer.encode(query + " " + choice)
            harness.append(plain_ending_loglik(logits_of, query_tokens, whole[len(query_tokens):], block)[0])
            chars.append(len(choice))
        sums = [s for s, _ in completion]
        means = [s / n for s, n in completion]
        per_char = [s / c if c else -np.inf for s, c in zip(harness, chars)]
        out.append({
            "label": int(record["label"]),
            "loglik": sums, "tokens": [n for _, n in completion], "loglik_harness": harness,
            "pred": int(np.argmax(sums)), "pred_norm": int(np.argmax(means)),
            "pred_harness": int(np.argmax(harness)), "pred_norm_harness": int(np.argmax(per_char)),
        })
    return out


def native_logits(model):
    def logits_of(tokens):
        with torch.no_grad():
            return model(torch.tensor([tokens]))[0][0, :, : model.config.vocab_size]
    return logits_of


def assert_matches_reference(result, reference):
    assert result.examples == len(reference)
    for score, expected in zip(result.scores, reference):
        assert score.label == expected["label"]
        assert score.tokens == tuple(expected["tokens"])
        np.testing.assert_allclose(score.loglik, expected["loglik"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(score.loglik_harness, expected["loglik_harness"], rtol=1e-5, atol=1e-4)
        assert (score.pred, score.pred_norm, score.pred_harness, score.pred_norm_harness) == (
            expected["pred"], expected["pred_norm"], expected["pred_harness"], expected["pred_norm_harness"]
        )
    for key, attribute in [("pred", "acc"), ("pred_norm", "acc_norm"), ("pred_harness", "acc_harness"),
                           ("pred_norm_harness", "acc_norm_harness")]:
        expected = sum(r[key] == r["label"] for r in reference) / len(reference)
        assert getattr(result, attribute) == pytest.approx(expected)


# ---- tests -------------------------------------------------------------------------------------


def test_both_scorings_equal_the_plain_reference(model, data_file):
    examples = read_examples(data_file)
    tokenizer = GPT2Tokenizer()
    # The file exercises the cut paths: a context and an ending that do not fit the block.
    assert len(tokenizer.encode(RECORDS[4]["ctx_a"])) > BLOCK and len(tokenizer.encode(" " + LONG)) > BLOCK
    result = HellaSwag(examples, tokenizer).evaluate(model, batch_size=64)
    reference = plain_reference(native_logits(model), RECORDS, BLOCK)
    assert_matches_reference(result, reference)
    # The metrics carry the names metrics.jsonl uses.
    assert result.metrics() == {
        "hellaswag_acc": result.acc, "hellaswag_acc_norm": result.acc_norm,
        "hellaswag_acc_harness": result.acc_harness, "hellaswag_acc_norm_harness": result.acc_norm_harness,
        "hellaswag_examples": len(RECORDS),
    }


def test_batched_equals_one_example_at_a_time(model, data_file):
    examples = read_examples(data_file)
    tokenizer = GPT2Tokenizer()
    batched = HellaSwag(examples, tokenizer).evaluate(model, batch_size=64)
    for example, score in zip(examples, batched.scores):
        alone = HellaSwag([example], tokenizer).evaluate(model, batch_size=1).scores[0]
        np.testing.assert_allclose(alone.loglik, score.loglik, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alone.loglik_harness, score.loglik_harness, rtol=1e-5, atol=1e-5)
        assert alone.tokens == score.tokens
        assert (alone.pred, alone.pred_norm, alone.pred_harness, alone.pred_norm_harness) == (
            score.pred, score.pred_norm, score.pred_harness, score.pred_norm_harness
        )


def test_padded_vocabulary_rows_are_not_part_of_the_distribution(model, data_file):
    examples = read_examples(data_file, limit=3)
    padded = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, padded_vocab_size=50304)).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, param in padded.named_parameters():
            if name == "transformer.wte.weight":
                param[: model.config.vocab_size].copy_(state[name])
                param[model.config.vocab_size:].fill_(3.0)  # would dominate the softmax if counted
            else:
                param.copy_(state[name])
    task = HellaSwag(examples, GPT2Tokenizer())
    plain, with_padding = task.evaluate(model), task.evaluate(padded)
    for a, b in zip(plain.scores, with_padding.scores):
        np.testing.assert_allclose(a.loglik, b.loglik, rtol=1e-5)


def test_transformers_model_and_native_loading_agree(tmp_path, data_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")

    def hf_logits(tokens):
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0]

    result = HellaSwag(read_examples(data_file), GPT2Tokenizer()).evaluate(ours, batch_size=8)
    assert_matches_reference(result, plain_reference(hf_logits, RECORDS, BLOCK))
    capsys.readouterr()
    code = main(["eval", "hellaswag", "--model", str(tmp_path / "hf"), "--data-file", str(data_file), "--json",
                 "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in result.metrics()} == pytest.approx(result.metrics())


def test_harness_preprocessing_of_wikihow_markup():
    example = parse_example(json.dumps({**RECORDS[2], "ctx": "x"}), 1)
    assert harness_query(example) == "Home and Garden: How to make a rock garden. Choose a sunny spot. rock plants"
    # As in the harness: the space left where a leading tag was removed stays.
    assert hs.harness_choices(example)[3] == " can be watered daily with a hose Water them."
    assert hs.harness_choices(example)[0] == "need sun. Look for a place with six hours of light."


def test_examples_are_strided_across_ranks(model, data_file):
    task = HellaSwag(read_examples(data_file), GPT2Tokenizer())
    full = task.evaluate(model)
    shares = [task.evaluate(model, rank=r, world_size=3) for r in range(3)]
    assert [[s.index for s in share.scores] for share in shares] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    by_index = {s.index: s for share in shares for s in share.scores}
    for score in full.scores:
        np.testing.assert_allclose(by_index[score.index].loglik, score.loglik, rtol=1e-5)
    # Without torch.distributed each rank counts only its own examples.
    assert [share.examples for share in shares] == [3, 3, 2]
    assert sum(share.correct_norm for share in shares) == full.correct_norm


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 1',
         r"line 3 is not valid JSON"),
        ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 4}',
         r"line 3: label 4 is not one of 0, 1, 2, 3"),
        ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": -1}',
         r"line 3: label -1"),
        ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c"], "label": 0}',
         r"line 3 has 3 endings; a HellaSwag example has exactly 4"),
        ('{"ctx": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 0}',
         r"line 3 has no 'ctx_a' field"),
        ('["not", "an", "object"]', r"line 3 is not a JSON object"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path, line, message, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", RECORDS[:2])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(UserError, match=message):
        read_examples(path)
    code = main(["eval", "hellaswag", "--model", "unused", "--data-file", str(path)])
    assert code == 2 and re.search(message, capsys.readouterr().err)


def test_missing_file_and_limit(tmp_path, data_file):
    with pytest.raises(UserError, match="does not exist"):
        load_examples(data_file=tmp_path / "nope.jsonl")
    assert [e.line for e in load_examples(data_file=data_file, limit=2)] == [1, 2]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no examples"):
        read_examples(tmp_path / "empty.jsonl")


def test_a_character_model_is_refused_with_the_reason(data_file):
    from gpt2lab.tokenizer import CharTokenizer

    with pytest.raises(UserError, match="line 1 cannot be written in this model's tokens.*GPT-2's tokenizer"):
        HellaSwag(read_examples(data_file), CharTokenizer.from_text("abc "))


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/www on 127.0.0.1 in place of GitHub; yields (folder, requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setattr(hs, "URL", f"http://127.0.0.1:{httpd.server_address[1]}/hellaswag_{{split}}.jsonl")
    yield root, requests
    httpd.shutdown()
    httpd.server_close()


def test_download_records_its_checksum_and_checks_it_later(server, cache):
    root, requests = server
    content = write_jsonl(root / "hellaswag_val.jsonl", RECORDS).read_bytes()
    path = hs.cached_file("val")
    assert path == cache / "hellaswag" / "hellaswag_val.jsonl" and path.read_bytes() == content
    sidecar = cache / "hellaswag" / "hellaswag_val.jsonl.sha256"
    assert sidecar.read_text().strip() == hashlib.sha256(content).hexdigest()
    assert len(load_examples("val")) == len(RECORDS) and requests == ["/hellaswag_val.jsonl"]
    # A damaged copy is fetched again and checked against the recorded checksum.
    path.write_bytes(content[:100])
    assert hs.cached_file("val").read_bytes() == content and len(requests) == 2
    # If the address now serves something else, the recorded checksum refuses it.
    (root / "hellaswag_val.jsonl").write_bytes(content + b"\n\n")
    path.write_bytes(content[:100])
    with pytest.raises(UserError, match=r"expected .*--data-file"):
        hs.cached_file("val")
    assert path.read_bytes() == content[:100]


def test_unknown_split_and_offline_download_name_the_way_around(server):
    with pytest.raises(UserError, match="unknown HellaSwag split 'test'"):
        hs.cached_file("test")
    with pytest.raises(UserError, match=r"cannot download .*hellaswag_val.jsonl.*pass the file with --data-file"):
        hs.cached_file("val")  # the server has no such file


def test_cli_prints_both_scorings(tmp_path, model, data_file, capsys):
    model.save_pretrained(tmp_path / "model")
    code = main(["eval", "hellaswag", "--model", str(tmp_path / "model"), "--data-file", str(data_file),
                 "--limit", "4", "--batch-size", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    expected = HellaSwag(read_examples(data_file, limit=4), GPT2Tokenizer()).evaluate(model)
    assert "4 examples" in out
    assert re.search(rf"completion\s+{expected.acc:.4f}\s+{expected.acc_norm:.4f}", out)
    assert re.search(rf"harness\s+{expected.acc_harness:.4f}\s+{expected.acc_norm_harness:.4f}", out)


def test_training_logs_hellaswag_every_interval_and_at_the_end(tmp_path, data_file):
    from gpt2lab.data.prepare import prepare
    from gpt2lab.train.config import resolve_config
    from gpt2lab.train.trainer import Trainer

    data = tmp_path / "shakespeare"
    prepare("shakespeare", data, progress=False, log=lambda m: None)
    overrides = [
        f"data.path={data}", "model.vocab_size=50257", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "batch.micro_batch=2", "batch.seq_len=32", "max_steps=7", "eval.interval=0",
        "eval.at_start=false", "eval.final_full=false", "eval.sample_interval=0", "log.interval=0",
        "log.progress_bar=false", "checkpoint.final=false", "eval.hellaswag_interval=3", "eval.hellaswag_limit=5",
        f"eval.hellaswag_file={data_file}",
    ]
    config = resolve_config("shakespeare-char-cpu", overrides=overrides)
    Trainer(config, tmp_path / "run", echo=lambda line: None).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "hellaswag_acc" in r]
    assert [r["step"] for r in logged] == [3, 6, 7]
    assert all(r["hellaswag_examples"] == 5 and 0 <= r["hellaswag_acc_norm_harness"] <= 1 for r in logged)
    assert all(r["tokens"] == r["step"] * 2 * 32 for r in logged)
    # The file is checked before training starts.
    bad = resolve_config("shakespeare-char-cpu", overrides=[*overrides, f"eval.hellaswag_file={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="does not exist"):
        Trainer(bad, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_training_on_two_ranks_gives_the_same_hellaswag_as_one(tmp_path):
    """Examples strided over 2 processes (DDP, and FSDP whose gathers need as many forward passes
    on every rank: here rank 0 has two batches and rank 1 one), counts summed."""
    import os
    import subprocess
    import sys

    from gpt2lab.data.prepare import prepare

    hellaswag = write_jsonl(tmp_path / "hellaswag.jsonl", [RECORDS[4], RECORDS[0], RECORDS[1]])
    data = tmp_path / "shakespeare"
    prepare("shakespeare", data, progress=False, log=lambda m: None)
    settings = [
        f"data.path={data}", "model.vocab_size=50257", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "model.dropout=0.0", "batch.micro_batch=2", "batch.seq_len=32",
        "batch.total_tokens=128", "max_steps=4", "optim.lr=3e-3", "schedule.warmup_steps=0", "eval.interval=0",
        "eval.at_start=false", "eval.final_full=false", "eval.sample_interval=0", "log.interval=0",
        "log.progress_bar=false", "eval.hellaswag_interval=2", f"eval.hellaswag_file={hellaswag}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def measures(name, *extra):
        args = [sys.executable, "-m", "gpt2lab", "train", "--preset", "shakespeare-char-cpu", "--out",
                str(tmp_path / name), *[f"--set={s}" for s in settings], *extra]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("hellaswag") or k == "step"} for r in records
                if "hellaswag_acc" in r]

    one = measures("one")
    assert [r["step"] for r in one] == [2, 4] and all(r["hellaswag_examples"] == 3 for r in one)
    assert measures("ddp", "--nproc=2", "--set=system.parallel=ddp") == one
    assert measures("fsdp", "--nproc=2", "--set=system.parallel=fsdp") == one


def test_a_modern_model_scores_as_the_plain_reference(make_model, data_file):
    """Packed rows carry each ending's own positions; with RoPE they must reach the rotation."""
    modern = make_model(block_size=BLOCK, position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu",
                        n_kv_head=1, logit_softcap=20.0, bias=False, peaked=True)
    result = HellaSwag(read_examples(data_file), GPT2Tokenizer()).evaluate(modern, batch_size=64)
    assert_matches_reference(result, plain_reference(native_logits(modern), RECORDS, BLOCK))
