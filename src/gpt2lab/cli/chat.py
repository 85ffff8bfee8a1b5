"""The `chat` verb: talk to a chat model in the terminal, or answer one prompt for a script."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from ..chat.template import validate_messages
from .options import (
    MODEL_HELP,
    add_device_options,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    seed,
    read_text_file,
)
from ..errors import UserError
from ..jsontext import parse_json

if TYPE_CHECKING:
    from ..chat.session import Chat, ChatSettings

DESCRIPTION = """Talk to a chat model: one fine-tuned on conversations (`gpt2lab prepare chat`, then
`gpt2lab train --preset sft`), whose tokenizer record carries the chat format. A base model
(OpenAI's gpt2, or any model without the chat tokens) is refused with exit status 2.

Interactive (no --prompt): type a message and the answer streams as it is generated; the
conversation is kept and sent whole with every message. Lines starting with / are commands:

  /system TEXT   set the system message for the whole conversation (/system alone removes it)
  /reset         forget the conversation (the system message stays)
  /history       print the conversation as one line of JSON, the form --history reads
  /help          list the commands
  /exit          quit (so do Ctrl-D and Ctrl-C at the prompt)

Start a line with // to send a message that begins with /. Ctrl-C during an answer stops
it and returns to the prompt; that question and its partial answer are left out of the
conversation, as if never asked. When the conversation outgrows the model's context, its
oldest messages (never the system message) are dropped, a turn at a time, with a note.

One-shot (--prompt TEXT): the answer alone is printed to stdout, then the command exits 0;
--history FILE gives the earlier messages, a JSON list like
  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
(a leading system message is allowed; --system replaces it). With no --prompt, --history
starts the interactive conversation from those messages.

Notes (drop oldest messages, a stopped answer, an answer cut at --max-new-tokens) go to
stderr, so stdout holds only answers (and /history)."""

EPILOG = """examples:
  gpt2lab chat --model runs/sft
  gpt2lab chat --model runs/sft --system "You answer in one sentence."
  gpt2lab chat --model runs/sft --prompt "What is the capital of France?" --temperature 0
  gpt2lab chat --model runs/sft --prompt "And of Italy?" --history earlier.json --max-new-tokens 64
  echo "Hello" | gpt2lab chat --model runs/sft      # reads messages line by line from a pipe

Temperature 0 is greedy decoding (repeatable without a seed); otherwise --seed makes a
session's answers repeatable. An answer ends at the model's end-of-turn token <|end|> (or
end-of-text), or after --max-new-tokens tokens."""

COMMANDS = "/system TEXT, /reset, /history, /help, /exit"


def add_chat_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    chat = verbs.add_parser(
        "chat",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    chat.add_argument("--model", required=True, help=MODEL_HELP + "; it must be a chat model")
    chat.add_argument("--prompt", metavar="TEXT", help="answer this one user message, print the answer and exit")
    chat.add_argument("--history", metavar="FILE", help="a JSON list of earlier messages to continue from")
    chat.add_argument("--system", metavar="TEXT", help="the system message (replaces one in --history)")
    chat.add_argument(
        "--max-new-tokens", type=non_negative_int, default=256, metavar="N",
        help="the longest answer, in tokens (default 256)",
    )
    chat.add_argument(
        "--temperature", type=non_negative_float, default=0.8, metavar="T",
        help="0 is greedy; higher is more random (default 0.8)",
    )
    chat.add_argument("--top-k", type=positive_int, default=200, metavar="K",
                      help="sample among the k most likely tokens (default 200)")
    chat.add_argument("--top-p", type=probability, default=None, metavar="P",
                      help="sample among the smallest set of tokens holding this probability")
    chat.add_argument("--seed", type=seed, default=1337, help="random seed, for repeatable answers (default 1337)")
    chat.add_argument(
        "--compile", action="store_true",
        help="decode through torch.compile (as `gpt2lab sample --compile`: a minute's compile on a CPU, then "
        "faster decoding after it; one compile serves the whole conversation)",
    )
    add_device_options(chat)
    chat.set_defaults(handler=cmd_chat)


def read_history(path: str | Path) -> list[dict[str, str]]:
    """The messages of a --history file, or a UserError naming the file and what is wrong."""
    text = read_text_file(path, "--history", "a JSON file")
    example = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    try:
        data = parse_json(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"--history file {path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"write a list of messages like {example}"
        ) from None
    if not isinstance(data, list):
        raise UserError(f"--history file {path} holds a JSON {type(data).__name__}, not a list; write {example}")
    if not data:
        return []
    try:
        return validate_messages(data)
    except UserError as error:
        raise UserError(f"--history file {path}: {error}") from None


@dataclass
class Conversation:
    """What the session has said so far: the system message apart, since /system replaces it
    and /reset keeps it."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def start(cls, history: list[dict[str, str]], system: str | None) -> Conversation:
        earlier = None
        if history and history[0]["role"] == "system":
            earlier, history = history[0]["content"], history[1:]
        system = earlier if system is None else system
        return cls(system or None, list(history))

    def messages(self, question: str | None = None) -> list[dict[str, str]]:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        tail = [] if question is None else [{"role": "user", "content": question}]
        return head + self.turns + tail


def cmd_chat(args: argparse.Namespace) -> int:
    from ..chat.session import ChatSettings, load_chat

    conversation = Conversation.start(read_history(args.history) if args.history else [], args.system)
    settings = ChatSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed,
    )
    settings.validate()
    chat, device, precision = load_chat(args.model, args.device, args.dtype, args.compile)
    if args.prompt is not None:
        return answer_once(chat, conversation.messages(args.prompt), settings, sys.stdout)
    sys.stderr.write(
        f"chatting with {args.model} ({device.type}, {precision}). Commands: {COMMANDS}. "
        "Ctrl-C stops an answer; Ctrl-D or /exit quits.\n"
    )
    sys.stderr.flush()
    session = Session(chat, conversation, settings, sys.stdout, sys.stderr)
    return session.run(line_reader(sys.stdin))


def answer_once(chat: Chat, messages: list[dict[str, str]], settings: ChatSettings, out: TextIO) -> int:
    stream = chat.stream(messages, settings)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if stream.finish_reason == "length":
        print(f"gpt2lab chat: the answer was cut at --max-new-tokens ({settings.max_new_tokens})", file=sys.stderr)
    return 0


def line_reader(stdin: TextIO) -> Callable[[], str]:
    """A function that returns the next line typed (EOFError at the end): with a prompt and line
    editing on a terminal, plain lines from a pipe."""
    if stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and recall)
        except ImportError:
            pass

        def prompt() -> str:
            try:
                return input(">>> ")
            except (EOFError, KeyboardInterrupt):
                print()  # the shell's prompt then starts on a line of its own
                raise

        return prompt

    def read() -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


class Session:
    """The interactive loop over one conversation."""

    def __init__(self, chat: Chat, conversation: Conversation, settings: ChatSettings, out: TextIO, err: TextIO):
        self.chat, self.conversation, self.settings = chat, conversation, settings
        self.out, self.err = out, err
        from ..inference.sampling import seeded_generator

        # One generator for the session: each answer continues its random stream, so that asking
        # the same thing twice can answer differently, and a seeded session repeats whole.
        self.generator = seeded_generator(next(chat.model.parameters()).device, settings.seed)
        block = chat.model.config.block_size
        self.context_limit = block - min(settings.max_new_tokens, block // 4)

    def note(self, text: str) -> None:
        self.err.write(f"[{text}]\n")
        self.err.flush()

    def run(self, read_line: Callable[[], str]) -> int:
        """Questions and commands until Ctrl-D, /exit or a Ctrl-C outside an answer (at the prompt,
        or while a command prints: the line it printed is no prompt yet)."""
        try:
            while True:
                line = read_line()
                if line.startswith("/") and not line.startswith("//"):
                    if not self.command(line):
                        return 0
                elif line.strip():
                    self.answer(line[1:] if line.startswith("//") else line)
        except (EOFError, KeyboardInterrupt):
            return 0

    def command(self, line: str) -> bool:
        """Carry out a /command; False for /exit."""
        name, _, text = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.conversation.turns = []
            self.note("conversation cleared" + ("; the system message is kept" if self.conversation.system else ""))
        elif name == "/system":
            self.conversation.system = text.strip() or None
            self.note("system message set" if self.conversation.system else "system message removed")
        elif name == "/history":
            self.out.write(json.dumps(self.conversation.messages(), ensure_ascii=False) + "\n")
            self.out.flush()
        elif name == "/help":
            self.note(f"commands: {COMMANDS}; start a line with // to send one that begins with /")
        else:
            self.note(f"unknown command {name}: the commands are {COMMANDS}; start the line with // to send it as text")
        return True

    def answer(self, question: str) -> None:
        from ..chat.session import fit_to_context

        messages, dropped = fit_to_context(self.conversation.messages(question), self.chat, self.context_limit)
        if dropped:
            keep = len(messages) - 1 - (self.conversation.system is not None)
            self.conversation.turns = self.conversation.turns[len(self.conversation.turns) - keep :]
            self.note(
                f"the {dropped} oldest messages no longer fit the model's context of "
                f"{self.chat.model.config.block_size} tokens and are dropped"
            )
        length = len(self.chat.prompt_ids(messages))
        if length > self.context_limit:
            self.note(
                f"this message (with the system prompt) is {length} tokens, more than the {self.context_limit} "
                f"of the model's context of {self.chat.model.config.block_size} that leave room for the answer: "
                "the model sees only its last part"
            )
        pieces = []
        try:
            stream = self.chat.stream(messages, self.settings, self.generator)
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
                pieces.append(piece)
        except KeyboardInterrupt:
            self.out.write("\n")
            self.out.flush()
            self.note("stopped; this question and the partial answer are not kept")
            return
        self.out.write("\n")
        self.out.flush()
        if stream.finish_reason == "length":
            self.note(f"the answer was cut at --max-new-tokens ({self.settings.max_new_tokens})")
        self.conversation.turns += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "".join(pieces)},
        ]
