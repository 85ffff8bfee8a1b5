"""`gpt2lab chat` (one-shot and interactive), `gpt2lab eval chat`, and the library under them
(`gpt2lab.chat`), over tiny models whose greedy answers are known."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.chat import session as chat_library
from gpt2lab.chat.session import Chat, ChatSettings, load_chat
from gpt2lab.chat.template import ChatTemplate
from gpt2lab.cli import main
from gpt2lab.cli.chat import Conversation, Session
from gpt2lab.errors import UserError
from gpt2lab.pretrained import save_pretrained
from gpt2lab.tokenizer import CharTokenizer, GPT2Tokenizer

CHAT_SPEC = {"type": "gpt2", "chat": "gpt2lab-chat-v1"}
TOKENIZER = GPT2Tokenizer(chat="gpt2lab-chat-v1")
ASSISTANT, END, EOT = 50259, 50260, 50256
ANSWER = "Paris is nice."
GREEDY = ("--temperature", "0", "--device", "cpu")


def scripted_model(chain: list[int]) -> GPT:
    """A chat-vocabulary model that greedily follows `chain`: after token chain[i] it predicts
    chain[i + 1] whatever came before. The blocks add nothing (their output projections are
    zero) and there are no positions, so the last token alone decides: token chain[i] embeds as
    the unit vector e_i, and the (untied) head's row chain[i + 1] is 10 * e_i."""
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=50261, padded_vocab_size=50304,
        tie_embeddings=False,
    )
    model = GPT(config).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.zero_()
        for i, (token, successor) in enumerate(zip(chain, chain[1:])):
            params["transformer.wte.weight"][token, i] = 1.0
            params["lm_head.weight"][successor, i] = 10.0
    return model


def save_scripted(tmp_path_factory, name: str, chain: list[int]) -> Path:
    return save_pretrained(scripted_model(chain), tmp_path_factory.mktemp(name) / "m", tokenizer_spec=CHAT_SPEC)


@pytest.fixture(scope="module")
def paris(tmp_path_factory) -> Path:
    """Answers every conversation with ANSWER, then <|end|>."""
    return save_scripted(tmp_path_factory, "paris", [ASSISTANT, *TOKENIZER.encode(ANSWER), END])


@pytest.fixture(scope="module")
def endless(tmp_path_factory) -> Path:
    """Answers " A B A B ..." and never ends its turn."""
    a, b = TOKENIZER.encode(" A B")
    return save_scripted(tmp_path_factory, "endless", [ASSISTANT, a, b, a])


@pytest.fixture(scope="module")
def random_chat(make_model_folder) -> Path:
    """Random weights whose greedy answers depend on the whole prompt."""
    return make_model_folder(
        "random-chat", tokenizer_spec=CHAT_SPEC, peaked=True, vocab_size=50261, padded_vocab_size=50304
    )


def run_cli(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_history(tmp_path: Path, messages) -> Path:
    path = tmp_path / "history.json"
    path.write_text(json.dumps(messages))
    return path


# ---- one-shot ------------------------------------------------------------------------------


def test_one_shot_prints_only_the_answer_which_stops_at_the_end_of_turn(capsys, paris):
    code, out, err = run_cli(capsys, "chat", "--model", paris, "--prompt", "Where?", *GREEDY)
    assert (code, out, err) == (0, ANSWER + "\n", "")
    # Sampled, the scripted answer is as certain (its logits lead by about 80).
    assert run_cli(capsys, "chat", "--model", paris, "--prompt", "Where?", "--device", "cpu")[1] == ANSWER + "\n"


def test_an_answer_also_stops_at_end_of_text(capsys, tmp_path_factory):
    folder = save_scripted(tmp_path_factory, "eot", [ASSISTANT, *TOKENIZER.encode("Rome."), EOT])
    assert run_cli(capsys, "chat", "--model", folder, "--prompt", "Where?", *GREEDY)[:2] == (0, "Rome.\n")
    chat, _, _ = load_chat(folder, "cpu")
    assert chat.greedy_replies([[{"role": "user", "content": "x" * n}] for n in (1, 9)], 8, batch_size=2) == ["Rome."] * 2


def test_max_new_tokens_cuts_the_answer_and_says_so_on_stderr(capsys, paris):
    code, out, err = run_cli(capsys, "chat", "--model", paris, "--prompt", "Where?", "--max-new-tokens", "2", *GREEDY)
    assert (code, out) == (0, "Paris is\n")
    assert "cut at --max-new-tokens (2)" in err


def test_history_and_system_are_in_the_prompt(capsys, tmp_path, monkeypatch, paris):
    history = [
        {"role": "system", "content": "old rules"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    prompts = []
    real_stream = chat_library.generate_stream

    def recording_stream(model, rows, *args, **kwargs):
        prompts.extend(rows)
        return real_stream(model, rows, *args, **kwargs)

    monkeypatch.setattr(chat_library, "generate_stream", recording_stream)
    args = ["chat", "--model", paris, "--history", write_history(tmp_path, history), "--prompt", "And?", *GREEDY]
    assert run_cli(capsys, *args)[:2] == (0, ANSWER + "\n")
    assert run_cli(capsys, *args, "--system", "new rules")[0] == 0
    template = ChatTemplate(TOKENIZER)
    assert prompts == [
        template.render_prompt(history + [{"role": "user", "content": "And?"}]),
        template.render_prompt(
            [{"role": "system", "content": "new rules"}, *history[1:], {"role": "user", "content": "And?"}]
        ),
    ]


def test_one_shot_answer_is_the_library_greedy_answer_to_the_whole_conversation(capsys, tmp_path, random_chat):
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    question = {"role": "user", "content": "Another?"}
    code, out, _ = run_cli(
        capsys, "chat", "--model", random_chat, "--history", write_history(tmp_path, history),
        "--prompt", question["content"], "--max-new-tokens", "12", *GREEDY,
    )
    chat, _, _ = load_chat(random_chat, "cpu")
    greedy = ChatSettings(max_new_tokens=12, temperature=0)
    assert code == 0
    assert out == chat.reply(history + [question], greedy) + "\n"
    assert out != chat.reply([question], greedy) + "\n"  # the earlier turns changed the answer


@pytest.mark.slow
def test_compiled_one_shot_answer_equals_the_eager_one(capsys, tmp_path, random_chat):
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    args = ["chat", "--model", random_chat, "--history", write_history(tmp_path, history), "--prompt", "Another?",
            "--max-new-tokens", "12", *GREEDY]
    eager = run_cli(capsys, *args)
    compiled = run_cli(capsys, *args, "--compile")
    assert eager[0] == compiled[0] == 0
    assert compiled[1] == eager[1] and len(eager[1]) > 3
    assert "AUTOTUNE" not in compiled[2]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{", "is not valid JSON (Expecting property name"),
        ('{"role": "user"}', "holds a JSON dict, not a list"),
        ('[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]', "message 1 has role 'robot'"),
        ('[{"role": "user", "content": 3}]', "message 0 (user) has content of type int"),
        ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]', "message 1 is a system message"),
    ],
)
def test_a_bad_history_file_is_one_clear_error(capsys, tmp_path, paris, content, message):
    path = tmp_path / "history.json"
    path.write_text(content)
    code, out, err = run_cli(capsys, "chat", "--model", paris, "--history", path, "--prompt", "x")
    assert (code, out) == (2, "")
    assert f"--history file {path}" in err and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_history_file_is_named(capsys, tmp_path, paris):
    code, _, err = run_cli(capsys, "chat", "--model", paris, "--history", tmp_path / "nope.json", "--prompt", "x")
    assert code == 2 and "nope.json does not exist" in err


def test_base_models_are_refused_with_the_way_to_a_chat_model(capsys, tmp_path, make_model_folder):
    plain = make_model_folder("base")  # OpenAI gpt2's record: "gpt2", 50257 ids
    examples = write_examples(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "x"}], "answer": "y"}])
    for args in (["chat", "--model", plain, "--prompt", "Hi"], ["eval", "chat", "--model", plain, "--data", examples]):
        code, out, err = run_cli(capsys, *args)
        assert (code, out) == (2, ""), err
        assert "base model without the chat tokens" in err and "plain 'gpt2'" in err
        assert "gpt2lab prepare chat" in err and "--preset sft" in err
    # The chat record on a model of 50257 ids is a record that does not describe the model.
    record = json.loads((plain / "gpt2lab.json").read_text())
    (plain / "gpt2lab.json").write_text(json.dumps({**record, "tokenizer": CHAT_SPEC}))
    code, out, err = run_cli(capsys, "chat", "--model", plain, "--prompt", "Hi")
    assert (code, out) == (2, "") and "vocab_size 50257 is less than the 50261 ids of its tokenizer" in err, err
    with pytest.raises(UserError, match="less than the 50261 ids"):
        save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)), tmp_path / "x", tokenizer_spec=CHAT_SPEC)


def test_a_character_model_is_refused(capsys, make_model_folder):
    tokenizer = CharTokenizer.from_text("abc ")
    folder = make_model_folder("char", tokenizer_spec=tokenizer.spec(), vocab_size=tokenizer.vocab_size)
    code, _, err = run_cli(capsys, "chat", "--model", folder, "--prompt", "abc")
    assert code == 2 and "chat needs a BPE tokenizer" in err


# ---- interactive -----------------------------------------------------------------------------


def test_interactive_commands_through_a_pipe(capsys, monkeypatch, paris):
    lines = ["Where?", "/history", "/system Be brief.", "/history", "", "Again?", "/reset", "/history",
             "/nonsense", "//slash", "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run_cli(capsys, "chat", "--model", paris, *GREEDY)
    assert code == 0
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assistant = {"role": "assistant", "content": ANSWER}
    system = {"role": "system", "content": "Be brief."}
    assert out.splitlines() == [
        ANSWER,
        json.dumps([user("Where?"), assistant]),
        json.dumps([system, user("Where?"), assistant]),
        ANSWER,
        json.dumps([system]),
        ANSWER,  # "//slash" is sent as the message "/slash"
    ]
    assert "chatting with" in err and "/reset" in err
    assert "[system message set]" in err and "[conversation cleared; the system message is kept]" in err
    assert "unknown command /nonsense" in err


def test_interactive_session_continues_from_history(capsys, tmp_path, monkeypatch, paris):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    monkeypatch.setattr(sys, "stdin", io.StringIO("/history\n"))
    code, out, _ = run_cli(capsys, "chat", "--model", paris, "--history", write_history(tmp_path, history), *GREEDY)
    assert code == 0 and out.splitlines() == [json.dumps(history)]  # EOF ends the session


class StopsOnWrite(io.StringIO):
    """Output whose `stop_at`-th write raises KeyboardInterrupt, as Ctrl-C during an answer."""

    def __init__(self, stop_at: int):
        super().__init__()
        self.writes, self.stop_at = 0, stop_at

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.stop_at:
            raise KeyboardInterrupt
        return super().write(text)


def scripted_reader(*lines):
    """A line reader over `lines`; KeyboardInterrupt among them is raised, as Ctrl-C at the prompt."""
    queue = list(lines)

    def read() -> str:
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    return read


def test_ctrl_c_stops_the_answer_drops_that_exchange_and_ctrl_c_at_the_prompt_quits(paris):
    chat, _, _ = load_chat(paris, "cpu")
    # The first answer is 5 writes (4 tokens and the newline); Ctrl-C comes after "Paris" of the second.
    out, err = StopsOnWrite(stop_at=7), io.StringIO()
    session = Session(chat, Conversation(), ChatSettings(temperature=0), out, err)
    assert session.run(scripted_reader("First?", "Second?", "/history", KeyboardInterrupt, "never read")) == 0
    first = [{"role": "user", "content": "First?"}, {"role": "assistant", "content": ANSWER}]
    assert out.getvalue().splitlines() == [ANSWER, "Paris", json.dumps(first)]
    assert "[stopped; this question and the partial answer are not kept]" in err.getvalue()


def test_the_oldest_turns_give_way_when_the_context_is_full(paris):
    chat, _, _ = load_chat(paris, "cpu")  # a context of 32 tokens; an exchange "Hi" + ANSWER takes 9
    out, err = io.StringIO(), io.StringIO()
    session = Session(chat, Conversation(system="S"), ChatSettings(temperature=0), out, err)
    session.run(scripted_reader("Hi", "Hi", "Hi", "Hi", "/history"))
    history = json.loads(out.getvalue().splitlines()[-1])
    assert out.getvalue().splitlines()[:4] == [ANSWER] * 4
    assert history[0] == {"role": "system", "content": "S"} and history[1]["role"] == "user"
    assert len(history) < 1 + 8
    assert len(chat.prompt_ids(history)) <= 32 - 32 // 4 + 9  # what was kept fit with one more exchange
    assert "oldest messages no longer fit the model's context of 32 tokens" in err.getvalue()


def test_a_message_longer_than_the_context_is_said_to_be_cut(paris):
    chat, _, _ = load_chat(paris, "cpu")  # a context of 32 tokens: 28 for the conversation, 4 for the answer
    out, err = io.StringIO(), io.StringIO()
    Session(chat, Conversation(), ChatSettings(temperature=0, max_new_tokens=4), out, err).run(
        scripted_reader("Hi", "word " * 40)
    )
    assert err.getvalue().count("the model sees only its last part") == 1
    assert "of the model's context of 32 that leave room for the answer" in err.getvalue()


def read_until(buffer: list[str], lock: threading.Lock, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            text = "".join(buffer)
        if pattern in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} did not appear in {text[-300:]!r}")


def drain(stream, buffer: list[str], lock: threading.Lock) -> threading.Thread:
    def run():
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            with lock:
                buffer.append(chunk.decode("utf-8", "replace"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_real_ctrl_c_stops_an_endless_answer_then_one_at_the_prompt_exits_cleanly(endless):
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "chat", "--model", str(endless), "--max-new-tokens", "1000000", *GREEDY],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err, lock = [], [], threading.Lock()
    threads = [drain(process.stdout, out, lock), drain(process.stderr, err, lock)]
    try:
        read_until(err, lock, "chatting with")
        process.stdin.write(b"Go on\n")
        process.stdin.flush()
        read_until(out, lock, " A B A B A B")
        process.send_signal(signal.SIGINT)
        read_until(err, lock, "[stopped;")
        process.stdin.write(b"/history\n")
        process.stdin.flush()
        read_until(out, lock, "[]\n")
        process.send_signal(signal.SIGINT)  # now at the prompt
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    for thread in threads:
        thread.join(timeout=10)
    assert "Traceback" not in "".join(err)


def test_a_terminal_session_prompts_stops_on_ctrl_c_and_quits_on_ctrl_d(endless):
    pid, terminal = pty.fork()
    if pid == 0:  # the child: gpt2lab chat with the pty as its controlling terminal
        try:
            os.execv(sys.executable, [sys.executable, "-m", "gpt2lab", "chat", "--model", str(endless),
                                      "--max-new-tokens", "1000000", *GREEDY])
        finally:
            os._exit(127)  # never back into pytest
    seen = bytearray()

    def read_until(pattern: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in seen:
            assert time.monotonic() < deadline, f"{pattern!r} did not appear in {bytes(seen[-300:])!r}"
            if select.select([terminal], [], [], 0.1)[0]:
                seen.extend(os.read(terminal, 4096))

    try:
        read_until(b">>> ")
        os.write(terminal, b"Go on\r")
        read_until(b" A B A B A B")
        os.write(terminal, b"\x03")  # Ctrl-C, as the terminal sends it
        read_until(b"[stopped;")
        read_until(b">>> ")
        os.write(terminal, b"/history\r")
        read_until(b"[]\r\n>>> ")
        os.write(terminal, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Traceback" not in seen


# ---- eval chat -------------------------------------------------------------------------------


def write_examples(path: Path, records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_eval_chat_counts_exact_matches(capsys, tmp_path, paris):
    user = {"role": "user", "content": "Where?"}
    data = write_examples(tmp_path / "prompts.jsonl", [
        {"messages": [user], "answer": ANSWER},
        {"messages": [user], "answer": f"  {ANSWER}\n"},  # whitespace at the ends does not count
        "",
        {"messages": [user, {"role": "assistant", "content": ANSWER}]},  # the last message is the answer
        {"messages": [{"role": "system", "content": "S"}, user, {"role": "assistant", "content": "x"}, user],
         "answer": ANSWER},
        {"messages": [user], "answer": "London."},
        {"messages": [user], "answer": "Paris is nice"},  # not the same answer
    ])
    result = tmp_path / "result.json"
    code, out, _ = run_cli(capsys, "eval", "chat", "--model", paris, "--data", data, "--json", result,
                           "--batch-size", "2", "--device", "cpu")
    assert code == 0
    assert "exact match 0.6667: 4 of 6 answers right, 2 wrong" in out
    record = json.loads(result.read_text())
    assert (record["chat_exact_match"], record["correct"], record["examples"]) == (4 / 6, 4, 6)
    assert [r["line"] for r in record["results"]] == [1, 2, 4, 5, 6, 7]
    assert [r["correct"] for r in record["results"]] == [True] * 4 + [False] * 2
    assert {r["answer"] for r in record["results"]} == {ANSWER}

    code, out, _ = run_cli(capsys, "eval", "chat", "--model", paris, "--data", data, "--limit", "5",
                           "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0 and "0 of 5 answers right" in out  # "Paris is" matches nothing


def test_eval_chat_batches_give_the_one_by_one_answers(capsys, tmp_path, random_chat):
    chat, _, _ = load_chat(random_chat, "cpu")
    greedy = ChatSettings(max_new_tokens=6, temperature=0)
    conversations = [[{"role": "user", "content": "word " * n}] for n in (1, 7, 3, 12, 2)]
    conversations.append([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c d"},
                          {"role": "user", "content": "e"}])
    expected = [chat.reply(messages, greedy) for messages in conversations]
    assert chat.greedy_replies(conversations, 6, batch_size=4) == expected
    data = write_examples(tmp_path / "p.jsonl", [{"messages": m, "answer": a} for m, a in zip(conversations, expected)])
    code, out, _ = run_cli(capsys, "eval", "chat", "--model", random_chat, "--data", data, "--max-new-tokens", "6",
                           "--batch-size", "4", "--device", "cpu")
    assert code == 0 and "6 of 6 answers right" in out


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2 is not valid JSON"),
        ('{"prompt": "x"}', "line 2 is not an object with a 'messages' list"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "line 2 has no expected answer"),
        ('{"messages": [{"role": "user", "content": "x"}], "answer": 4}', "line 2 has an 'answer' of type int"),
        ('{"messages": [{"role": "assistant", "content": "x"}], "answer": "y"}', "must end with a user turn"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "must end with a user turn"),
        ('{"messages": [{"role": "bot", "content": "x"}], "answer": "y"}', "line 2: message 0 has role 'bot'"),
    ],
)
def test_eval_chat_names_the_bad_line(capsys, tmp_path, paris, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "x"}], "answer": "y"})
    data = write_examples(tmp_path / "p.jsonl", [good, line])
    code, out, err = run_cli(capsys, "eval", "chat", "--model", paris, "--data", data)
    assert (code, out) == (2, "")
    assert message in err and "Traceback" not in err


def test_eval_chat_refuses_an_empty_file_and_a_json_path_without_folder(capsys, tmp_path, paris):
    empty = write_examples(tmp_path / "empty.jsonl", [""])
    code, _, err = run_cli(capsys, "eval", "chat", "--model", paris, "--data", empty)
    assert code == 2 and "holds no examples" in err
    good = write_examples(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "x"}], "answer": "y"}])
    code, _, err = run_cli(capsys, "eval", "chat", "--model", paris, "--data", good, "--json", tmp_path / "no" / "r.json")
    assert code == 2 and "the folder of --json" in err


def test_eval_chat_of_a_token_folder_says_to_use_eval_loss(capsys, tmp_path, paris):
    from gpt2lab.data.prepare import prepare

    prepare("shakespeare", tmp_path / "bpe", progress=False, log=lambda m: None)
    code, _, err = run_cli(capsys, "eval", "chat", "--model", paris, "--data", tmp_path / "bpe", "--device", "cpu")
    assert code == 2 and "gpt2lab eval loss" in err


# ---- manuals and the library ---------------------------------------------------------------


@pytest.mark.parametrize("verb", [["chat"], ["eval", "chat"]])
def test_the_manuals_are_complete(capsys, verb):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--max-new-tokens" in text and "--model" in text
    for word in (["/system", "/reset", "/exit", "Ctrl-C", "--history", "--prompt", "--seed", "--dtype"]
                 if verb == ["chat"] else ["--limit", "--json", "--batch-size", "exact", "answer"]):
        assert word in text


def test_bad_settings_are_refused_before_any_token(paris):
    chat, _, _ = load_chat(paris, "cpu")
    with pytest.raises(UserError, match="temperature must be a finite number"):
        chat.stream([{"role": "user", "content": "x"}], ChatSettings(temperature=float("nan")))
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        chat.greedy_replies([[{"role": "user", "content": "x"}]], 4, batch_size=0)


def test_a_reply_stream_reports_why_it_ended(paris):
    chat, _, _ = load_chat(paris, "cpu")
    messages = [{"role": "user", "content": "x"}]
    stream = chat.stream(messages, ChatSettings(temperature=0))
    assert "".join(stream) == ANSWER and stream.finish_reason == "stop"
    assert stream.token_ids == TOKENIZER.encode(ANSWER)
    stream = chat.stream(messages, ChatSettings(temperature=0, max_new_tokens=3))
    assert "".join(stream) == "Paris is nice" and stream.finish_reason == "length"
    assert Chat(chat.model, TOKENIZER).reply(messages, ChatSettings(temperature=0, max_new_tokens=0)) == ""
