"""The teachers' disk cache: every answer is kept, so no request is paid for twice.

One append-only JSONL file; each line is ``{"key", "model", "text", "prompt_tokens",
"completion_tokens"}``, written with one ``write`` then ``flush`` + ``fsync`` before the answer is
used. A crash (kill -9, power loss) can at worst leave a torn last line (no newline): on open it
is dropped and the file truncated back to the last complete line, so the next append starts
clean. A complete line that is not an entry (an edited or damaged file) is an error naming the
file and line, and nothing is truncated: every answer after it is a paid request. The key is
the SHA-256 of the canonical JSON of (model, full request body): any change to the prompt,
model or sampling settings is a new request.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from grouprank_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Not an answer of the teacher (e.g. a prompt over the in-process teacher's length limit):
    # used for this run, never cached, so a rerun with a larger limit asks again.
    cacheable: bool = True


def cache_key(model: str, body: dict) -> str:
    blob = json.dumps({"model": model, "body": body}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class DiskCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, Completion] = {}
        self._lock = threading.Lock()
        self._handle = open(self.path, "ab")
        try:  # one writer per cache file; the OS drops the lock when its process dies (kill -9 too)
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.close()
            raise UserError(
                f"{self.path}: another grouprank synth is using this cache; wait for it or use --cache"
            ) from None
        try:
            self._load()
        except UserError:
            self._handle.close()
            raise

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0  # byte offset just past the last complete line
        for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                break  # only the last line can lack its newline: a torn append
            try:
                row = json.loads(line)
                key = row["key"]
                entry = Completion(row["text"], int(row.get("prompt_tokens", 0)), int(row.get("completion_tokens", 0)))
            except (ValueError, KeyError, TypeError) as err:
                what = f"missing {err}" if isinstance(err, KeyError) else str(err)
                raise UserError(
                    f"{self.path}:{lineno}: not a cache entry ({what}); repair or delete that line "
                    "(the entries after it are kept)"
                ) from None
            self._entries[key] = entry
            good += len(line)
        if good < len(data):
            log.warning(
                "%s: dropped a torn last entry (%d bytes, line %d) left by an interrupted run",
                self.path,
                len(data) - good,
                data[:good].count(b"\n") + 1,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
                handle.flush()
                os.fsync(handle.fileno())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Completion | None:
        return self._entries.get(key)

    def put(self, key: str, model: str, completion: Completion) -> None:
        row = {
            "key": key,
            "model": model,
            "text": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._entries[key] = completion

    def close(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._handle.close()

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
