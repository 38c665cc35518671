"""Calibration as Qwen3 is used: conversations rendered through the model's own chat template.

`--calib chat` (also `chat:en`, `chat:zh`) reads the shipped set `data/calibration/chat.jsonl` (512 conversations
made from CC BY-SA Wikipedia paragraphs by calibration/build_chat.py; half with thinking turns, half non-thinking;
provenance and the mix in calibration/README.md). `--calib FILE.jsonl` whose records carry `"messages"` (a list of
`{"role", "content"}`) is rendered the same way, so a team can calibrate on its own chat logs.

Rendering is `tokenizer.apply_chat_template(messages, tokenize=False)`: the model's template decides the markers
(`<|im_start|>role ... <|im_end|>` for Qwen3) and what it does with earlier turns' reasoning. Assistant turns keep
their `<think>...</think>` block inline in the content, the form every Qwen3 template accepts (newer ones split it
into `reasoning_content` themselves).
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenquant.errors import BadInputError

CHAT_FILE = "chat.jsonl"
CHAT_SETS = {"chat": ("en", "zh"), "chat:en": ("en",), "chat:zh": ("zh",)}
ROLES = ("system", "user", "assistant")


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadInputError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise BadInputError(f'{where}: each message needs "role" ({" | ".join(ROLES)}) and a "content" string; '
                                f"got {json.dumps(m, ensure_ascii=False)[:80]}")
    return messages


def read_conversations(path: Path, langs: tuple[str, ...] | None = None) -> list[list[dict]]:
    """The `messages` lists of a chat .jsonl file, in file order; `langs` keeps records whose `lang` is in it."""
    convs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path}:{n}: not valid JSON ({err.msg}); one JSON object per line") from err
            if not isinstance(record, dict) or "messages" not in record:
                raise BadInputError(f'{path}:{n}: no "messages" field; a chat file has {{"messages": [...]}} on '
                                    "every line")
            if langs is None or record.get("lang") in langs:
                convs.append(_check_messages(record["messages"], f"{path}:{n}"))
    return convs


def is_chat_file(path: Path) -> bool:
    """Whether a .jsonl file is a chat file: its first record has a `messages` field."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the plain reader reports the bad line
                return isinstance(record, dict) and "messages" in record
    return False


def render(conversations: list[list[dict]], tokenizer) -> list[str]:
    """Each conversation as the text the model sees, through its own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError("the model's tokenizer has no chat template, so --calib chat cannot render "
                            "conversations; use --calib builtin (plain text) or a model with a chat template")
    return [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations]


def chat_texts(source: str, tokenizer, builtin_dir: Path) -> list[str] | None:
    """Rendered conversations when `source` is a chat set or a chat .jsonl file; None for plain-text sources."""
    if source in CHAT_SETS:
        path = builtin_dir / CHAT_FILE
        if not path.is_file():
            raise BadInputError(f"builtin chat calibration data is missing ({path}); reinstall qwenquant or pass "
                                "--calib FILE.jsonl")
        return render(read_conversations(path, CHAT_SETS[source]), tokenizer)
    path = Path(source).expanduser()
    if is_chat_file(path):
        return render(read_conversations(path), tokenizer)
    return None
