"""Text files as raykit reads them: UTF-8, or one line naming the line and the byte; JSON Lines whose
every line is an object of valid Unicode, or one line naming the line."""

from __future__ import annotations

import json

from raykit import storage
from raykit.errors import DataError


def read_jsonl(path: str):
    """(line number, object) for each non-blank line of a JSON Lines file."""
    data = storage.read_bytes(path)
    if not data.strip():
        raise DataError(f"{path}: empty file")
    for lineno, line in enumerate(utf8(data, path).splitlines(), start=1):
        if line.strip():
            yield lineno, json_object(line, f"{path}:{lineno}")


def json_object(line: str, where) -> dict:
    """One line of JSON Lines as an object of valid Unicode, or one line naming `where` (file:line;
    or a function that says it, called only for an error: finding a line number can cost a read)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{_said(where)}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{_said(where)}: expected a JSON object, got {type(rec).__name__}")
    check_unicode(line, rec, where)
    return rec


def _said(where) -> str:
    return where() if callable(where) else where


def utf8(data: bytes, path: str, first_line: int = 1) -> str:
    """A text file's bytes as text, or one line naming the file, the line and the byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}; a latin-1 or cp1252 file?); "
                        "save it as UTF-8") from None


def check_unicode(line: str, rec: dict, where) -> None:
    """Refuse a JSON line whose strings hold a lone surrogate (a \\udXXX escape without its pair):
    not text any tokenizer or UTF-8 writer takes. Checked only where such an escape appears."""
    if "\\ud" not in line.lower():
        return
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{_said(where)}: a lone surrogate (\\u{ord(e.object[e.start]):04x}) in a string; it is not "
                        "valid Unicode: fix the text that wrote this file") from None
