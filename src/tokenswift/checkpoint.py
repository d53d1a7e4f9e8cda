"""Resumable runs: a checkpoint file holds a generation's options, prompt and committed tokens.

Sampling is keyed by absolute position (DESIGN.md, losslessness), so a run continued from any
prefix of its committed tokens — the prompt plus those tokens as the new prompt, the same seed
and options — writes exactly the tokens the uninterrupted run would have written. A checkpoint
therefore needs no RNG state, only the tokens.

Files are JSON, replaced atomically (temp file, fsync, rename), so a process killed at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "tokenswift-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    options: dict[str, Any]  # everything the text depends on: model, dtype, method, sampling, ...
    prompt: str  # the prompt as given (tokenized on resume when prompt_ids is still unknown)
    prompt_ids: list[int] | None = None  # the prompt's token ids, chat template applied
    tokens: list[int] = field(default_factory=list)  # committed new tokens
    finish_reason: str | None = None  # "eos" / "length" once the run has ended
    model_fingerprint: dict[str, Any] | None = None  # shape of the model that wrote the tokens

    @property
    def max_new_tokens(self) -> int:
        return int(self.options["max_new_tokens"])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or len(self.tokens) >= self.max_new_tokens

    def save(self, path: str | os.PathLike[str]) -> None:
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        write_atomic(Path(path), json.dumps(data, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Checkpoint":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file not found: {path}") from None
        except IsADirectoryError:
            raise ValueError(f"checkpoint {path} is a directory") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"checkpoint {path} is damaged (not JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a tokenswift checkpoint")
        if data.get("version") != VERSION:
            raise ValueError(f"checkpoint {path} has version {data.get('version')!r}; this tokenswift reads {VERSION}")
        try:
            ck = cls(options=dict(data["options"]), prompt=str(data["prompt"]), prompt_ids=data.get("prompt_ids"),
                     tokens=list(data.get("tokens", [])), finish_reason=data.get("finish_reason"),
                     model_fingerprint=data.get("model_fingerprint"))
            int(ck.options["max_new_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is damaged (missing or bad field {e})") from None
        ids = (ck.prompt_ids or []) + ck.tokens
        if not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"checkpoint {path} is damaged (token ids must be integers >= 0)")
        if len(ck.tokens) > ck.max_new_tokens:
            raise ValueError(f"checkpoint {path} is damaged ({len(ck.tokens)} tokens > max_new_tokens "
                             f"{ck.max_new_tokens})")
        return ck


def model_fingerprint(cfg: Any) -> dict[str, Any]:
    """What must match for a checkpoint's tokens to continue on a model: its shape and context."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "layers": cfg.num_layers,
            "context_length": cfg.context_length}


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` so that readers (and a crash) see the old or the new file whole."""
    tmp = path.with_name(f".{path.name}.tmp")  # one fixed name: a killed writer leaves no litter behind
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
