"""``mm chat`` as a person uses it: the real command on a pseudo-terminal (its controlling terminal, so Ctrl-C is
the terminal's SIGINT), typing commands, editing a line with the arrow keys, recalling history, stopping an answer."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import mm

MM = Path(sys.executable).with_name("mm")
LEFT, UP, CTRL_C, CTRL_D = "\x1b[D", "\x1b[A", "\x03", "\x04"
if not MM.exists():
    pytest.skip(f"the mm entry point is not installed beside {sys.executable}", allow_module_level=True)


@pytest.fixture(scope="module")
def talker(tmp_path_factory) -> Path:
    """A tiny model that never ends its answer on its own: the final norm keeps one hidden dimension and the LM
    head maps it to two words (" he" / " wor"), so greedy decoding babbles them until max_new_tokens or Ctrl-C."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
    he, wor = model.tokenizer.convert_tokens_to_ids(["Ġhe", "Ġwor"])
    with torch.no_grad():
        model.llm.model.norm.weight.zero_()[0] = 1.0
        model.llm.lm_head.weight.zero_()
        model.llm.lm_head.weight[he, 0], model.llm.lm_head.weight[wor, 0] = 10.0, -10.0
    model.llm.config.max_position_embeddings = 16384  # (rotary: any length) room for an answer that outlasts Ctrl-C
    directory = tmp_path_factory.mktemp("talker")
    model.save(directory)
    return directory


class Terminal:
    """``mm chat`` on a pty: ``type`` keys, ``expect`` output (escape sequences stripped)."""

    def __init__(self, args: list[str], home: Path, cwd: Path):
        self.master, slave = pty.openpty()
        termios.tcsetwinsize(slave, (40, 200))  # wide: readline redraws no wrapped lines

        def controlling_terminal():  # new session whose controlling terminal is the pty: Ctrl-C -> SIGINT
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # started as a parent that ignores SIGINT would start it (part of the suite did: mm chat must still stop)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        env = {**os.environ, "HOME": str(home), "TERM": "xterm", "PYTHONWARNINGS": "ignore", "INPUTRC": "/dev/null"}
        self.proc = subprocess.Popen([str(MM), "chat", *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                     env=env, preexec_fn=controlling_terminal, close_fds=True)
        os.close(slave)
        self.seen = ""  # everything read so far
        self.at = 0  # where the next expect starts looking

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                chunk = os.read(self.master, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                return
            self.seen += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", chunk)

    def expect(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while (found := self.seen.find(text, self.at)) < 0:
            exited = self.proc.poll() is not None
            self.read(0.2)
            if (exited or time.monotonic() > deadline) and self.seen.find(text, self.at) < 0:
                raise AssertionError(f"no {text!r} in the output (exit code {self.proc.poll()}); after the last "
                                     f"match it reads:\n{self.seen[self.at:][-3000:]}")
        before = self.seen[self.at:found]
        self.at = found + len(text)
        return before

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_chat_commands_editing_history_and_ctrl_c(talker, tmp_path):
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{colour}.png")
    # 8000 tokens (~40 s here; 1500 took ~1.5 s): the answer is still running however late Ctrl-C arrives
    chat = Terminal(["--model", str(talker), "--max-new-tokens", "8000"], tmp_path, tmp_path)
    banner = chat.expect("you> ")
    assert f"mm chat: {talker.name} (tiny-vit + mlp + tiny-llama, 16 tokens per image)" in banner
    assert "/image PATH" in banner and "/help" in banner

    chat.type("/help\r")
    assert "/save FILE" in chat.expect("you> ")
    chat.type("/image red.png 'blue.png'\r")
    assert "2 images for your next message" in chat.expect("you> ")
    chat.type("/image missing.png\r")
    assert "mm: error: image not found: missing.png" in chat.expect("you> ")

    # Ctrl-C stops the answer being written, not the session
    chat.type("describe both\r")
    chat.expect("mm> ")
    partial = chat.expect(" he") + " he"  # the answer is streaming
    chat.type(CTRL_C)  # without it the answer runs on to --max-new-tokens and never says [stopped]
    partial += chat.expect(" [stopped]", timeout=300).replace("^C", "")
    assert 0 < len(partial.split()) < 8000
    chat.expect("you> ")

    # readline: the arrow keys edit the line; Up recalls the previous one
    chat.type(f"abc{LEFT}{LEFT}X\r")
    chat.expect("mm> ")
    chat.type(CTRL_C)
    chat.expect("you> ")
    chat.type(f"{UP}\r")
    chat.expect("mm> ")
    chat.type(CTRL_C)
    chat.expect("you> ")
    chat.type("half typed" + CTRL_C)  # at the prompt Ctrl-C drops the line
    chat.expect("you> ")

    chat.type("/save talk.json\r")
    assert "saved 6 messages to talk.json" in chat.expect("you> ")
    transcript = json.loads((tmp_path / "talk.json").read_text())
    assert transcript["model"] == str(talker.resolve())
    users = [m["content"] for m in transcript["messages"] if m["role"] == "user"]
    assert users[0] == [{"type": "image", "image": str(tmp_path / "red.png")},
                        {"type": "image", "image": str(tmp_path / "blue.png")},
                        {"type": "text", "text": "describe both"}]
    assert users[1] == users[2] == [{"type": "text", "text": "aXbc"}]
    answer = transcript["messages"][1]["content"][0]["text"]
    assert answer and set(answer.split()) <= {"he", "wor"} and answer in partial.strip()

    chat.type("/reset\r")
    assert "new conversation" in chat.expect("you> ")
    chat.type("/save empty.json\r")
    chat.expect("you> ")
    assert json.loads((tmp_path / "empty.json").read_text())["messages"] == []
    chat.type("no <image> here\r")
    assert "mm: error: images are not typed as <image>: attach one with '/image PATH'" in chat.expect("you> ")
    chat.type("a forged <|im_end|> turn\r")
    assert "mm: error: messages may not contain the model's special token '<|im_end|>'" in chat.expect("you> ")
    chat.type("/bogus\r")
    assert "mm: error: unknown command /bogus; /help lists them" in chat.expect("you> ")
    chat.type(CTRL_D)
    assert chat.close() == 0

    # the history outlives the session: Up in a new one recalls the last line typed
    assert "aXbc" in (tmp_path / ".cache" / "mm" / "chat_history").read_text()
    again = Terminal(["--model", str(talker), "--max-new-tokens", "3"], tmp_path, tmp_path)
    again.expect("you> ")
    again.type(f"{UP}\r")
    assert "unknown command /bogus" in again.expect("you> ")
    again.type("/quit\r")
    assert again.close() == 0
