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
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .params import PARAMS, ParamError, is_int, json_problem, short_repr

if TYPE_CHECKING:
    from .api import LM
    from .engine import Step

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
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)  # a bound: /dev/zero or a disk image is not read whole
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file not found: {path}") from None
        except IsADirectoryError:
            raise ValueError(f"checkpoint {path} is a directory") from None
        except OSError as e:
            raise ValueError(f"cannot read the checkpoint {path}: {e.strerror or e}") from None
        if len(raw) > MAX_BYTES:
            raise ValueError(f"{path} is not a tokenswift checkpoint: it is larger than {MAX_BYTES >> 20} MiB")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError(f"checkpoint {path} is damaged ({json_problem(e)})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a tokenswift checkpoint")
        if data.get("version") != VERSION:
            raise ValueError(f"checkpoint {path} has version {data.get('version')!r}; this tokenswift reads {VERSION}")
        def damaged(why: str) -> ValueError:
            return ValueError(f"checkpoint {path} is damaged: {why}")

        options = data.get("options")
        if not isinstance(options, dict):
            raise damaged(f"options must be an object, got {short_repr(options, 60)}")
        for key in ("sampling", "spec"):
            if key in options and not isinstance(options[key], dict):
                raise damaged(f"options.{key} must be an object, got {short_repr(options.get(key), 60)}")
        for key in ("chat", "compile"):  # the others are checked by their parameter or by `load`
            if key in options and not isinstance(options[key], bool):
                raise damaged(f"options.{key} must be true or false, got {short_repr(options[key], 60)}")
        try:
            PARAMS["max_new_tokens"].check(options.get("max_new_tokens"))
        except ParamError as e:
            raise damaged(e.named("options.max_new_tokens")) from None
        if not isinstance(data.get("prompt"), str):
            raise damaged(f"prompt must be a string, got {short_repr(data.get('prompt'), 60)}")
        for key in ("prompt_ids", "tokens"):
            v = data.get(key)
            if v is None and key == "prompt_ids":
                continue
            if not isinstance(v, list) or not all(is_int(t) and t >= 0 for t in v):
                raise damaged(f"{key} must be a list of token ids (integers >= 0), got {short_repr(v, 60)}")
            if key == "prompt_ids" and not v:  # a run never starts from nothing (an empty prompt is refused)
                raise damaged("prompt_ids is empty: a prompt has at least one token")
        if data.get("finish_reason") not in FINISH_REASONS:
            raise damaged(f"finish_reason must be one of {', '.join(map(str, FINISH_REASONS))}, "
                          f"got {short_repr(data.get('finish_reason'), 60)}")
        fp = data.get("model_fingerprint")
        if fp is not None and not isinstance(fp, dict):
            raise damaged(f"model_fingerprint must be an object, got {short_repr(fp, 60)}")
        ck = cls(options=options, prompt=data["prompt"], prompt_ids=data.get("prompt_ids"), tokens=data["tokens"],
                 finish_reason=data.get("finish_reason"), model_fingerprint=fp)
        if len(ck.tokens) > ck.max_new_tokens:
            raise damaged(f"{len(ck.tokens)} tokens > max_new_tokens {ck.max_new_tokens}")
        return ck

    def check_vocabulary(self, path: str | os.PathLike[str], vocab_size: int) -> None:
        """Every saved token id must be one of the loaded model's."""
        for key, ids in (("prompt_ids", self.prompt_ids or []), ("tokens", self.tokens)):
            for i, t in enumerate(ids):
                if t >= vocab_size:
                    raise ValueError(f"checkpoint {path} is damaged: {key}[{i}] = {t} is outside the model's "
                                     f"vocabulary [0, {vocab_size})")


FINISH_REASONS = (None, "eos", "length")
MAX_BYTES = 256 << 20  # a checkpoint holds a prompt (at most 64 MiB of text) and its run's token ids


def claim(path: Path, own: Path | None = None, kv: Path | None = None) -> None:
    """Refuses to write a run's checkpoint at `path` (and its KV rows at `kv`) where a file that is
    not the run's own already stands: a checkpoint replaces its file (an atomic rename), so a
    mistyped path would replace a chapter, a config, even a device node. `own`: the checkpoint
    the run resumes, which it keeps writing. A KV file of ours is a cache checked row by row on
    reading, so one that stands there already is the run's to extend or rewrite."""
    if own is None or not _same_file(path, own):
        if path.is_dir():
            raise ValueError(f"cannot write the checkpoint {path}: is a directory")
        if os.path.lexists(path):
            if _starts_with(path, b'{"format": "%s"' % FORMAT.encode()):  # as `save` begins every checkpoint
                raise ValueError(f"the checkpoint {path} exists and holds another run: continue it with --resume "
                                 f"{path}, or give a path that does not exist")
            raise ValueError(f"{path} exists and is not this run's checkpoint; it is left as it is: give a path "
                             f"that does not exist")
    if kv is not None and os.path.lexists(kv) and not _starts_with(kv, KVRows.FAMILY):
        raise ValueError(f"{kv} exists and is not a tokenswift KV file; it is left as it is: move it, or give "
                         f"--checkpoint another path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether `path` is a regular file that begins with `prefix`."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


def load_model_for(ck: Checkpoint, path: str | os.PathLike[str] | None = None) -> "LM":
    """Loads the model a checkpoint's run uses, with its options, and checks that the run fits it
    (vocabulary, shape). Pins what "default" resolved to (device, dtype): another device or dtype
    would change the numerics, so the text. Tokenizes the prompt when the checkpoint has not yet."""
    import tokenswift

    o = ck.options
    # the int4 copy is built only if the run drafts with it (`LM.int4`)
    lm = tokenswift.load(o["model"], heads=o["heads"], device=o["device"], dtype=o["dtype"],
                         rope_scaling=o["rope_scaling"], draft_weights=o["spec"].get("draft_weights", "auto"),
                         drafter=o.get("seq_drafter", "auto"), compile=bool(o.get("compile", False)),
                         kv_dtype=o.get("kv_dtype", "auto"), weights=o.get("weights", "auto"),
                         activations=o.get("activations", "float"),
                         attention_dtype=o.get("attention_dtype", "float32"))
    ck.check_vocabulary(path, lm.config.vocab_size)
    fp = model_fingerprint(lm.config)
    if ck.model_fingerprint is not None and ck.model_fingerprint != fp:
        raise ValueError(f"checkpoint {path} was written by a model shaped {ck.model_fingerprint}, "
                         f"but {o['model']!r} loads as {fp}")
    ck.model_fingerprint = fp
    o["device"], o["dtype"] = str(lm.model.device), str(lm.model.dtype).removeprefix("torch.")
    o["kv_dtype"] = str(lm.model.kv_dtype).removeprefix("torch.")
    if ck.prompt_ids is None:
        ck.prompt_ids = lm.encode(ck.prompt, chat=o["chat"])
    if ck.tokens and not o["ignore_eos"] and ck.tokens[-1] in lm.eos_token_ids:
        ck.finish_reason = ck.finish_reason or "eos"  # killed between committing EOS and saving the end
    return lm


def continue_run(ck: Checkpoint, lm: "LM", path: str | os.PathLike[str] | None = None,
                 every: int = 256, kv: str | os.PathLike[str] | None = None) -> Iterator["Step"]:
    """The steps that continue the checkpoint's run on `lm` (from `load_model_for`): each step's
    tokens are appended to `ck.tokens`, and `ck` is saved to `path` every `every` new tokens and
    when the iteration ends, however it ends (close the iterator on an early exit). Options are
    checked now: a bad one raises here, before the first step.

    `kv`: a file for the committed tokens' keys and values (`KVRows`, the CLI's `<FILE>.kv`): read
    back where it matches, so the resumed run prefills only what it lacks, and appended to at
    every save. None keeps no rows."""
    o = ck.options
    spec = dict(o["spec"])
    if "full_kv_draft" in spec:  # written before draft_kv replaced it (a speed option: the text is the same)
        spec.setdefault("draft_kv", "full" if spec.pop("full_kv_draft") else "auto")
    rows = None
    if kv is not None and lm.model.tp is None:  # under tensor parallelism a rank holds some heads only
        rows = KVRows(Path(kv), ck)
        if not ck.done:
            lm.model.kv_prefix = rows.load  # one use, by the run's prefill
    try:
        steps = iter(()) if ck.done else lm.steps(
            ck.prompt_ids + ck.tokens, ck.max_new_tokens - len(ck.tokens), method=o["method"],
            ignore_eos=o["ignore_eos"], **o["sampling"], **spec)
    except BaseException:
        lm.model.kv_prefix = None
        raise
    return _saving(ck, steps, path, every, rows, lm)


def _saving(ck: Checkpoint, steps: Iterator["Step"], path: str | os.PathLike[str] | None,
            every: int, rows: "KVRows | None" = None, lm: "LM | None" = None) -> Iterator["Step"]:
    saved = len(ck.tokens)
    kv, kv_len = None, 0  # the main cache and its committed length at the last step

    def save() -> None:
        if rows is not None and kv is not None:
            rows.append(kv, kv_len, ck.prompt_ids + ck.tokens)
        save_to(ck, path)

    try:
        for step in steps:
            ck.tokens.extend(step.tokens)
            if step.kv is not None:
                kv, kv_len = step.kv, step.kv.length
            if step.finished:
                ck.finish_reason = step.stats.get("finish_reason")
            if path is not None and len(ck.tokens) - saved >= every:
                save()
                saved = len(ck.tokens)
            yield step
    finally:
        if lm is not None:
            lm.model.kv_prefix = None
        if path is not None:
            save()
        if rows is not None and ck.done:
            rows.remove()  # the run is over: nothing will read them
        close = getattr(steps, "close", None)
        if close is not None:
            close()


class KVRows:
    """The keys and values of a run's committed text, beside its checkpoint (`<checkpoint>.kv`),
    so that a resumed run reads them instead of recomputing them: a prefill of 80K tokens takes
    most of an hour on two CPU cores, reading them back seconds. The cache's entries of committed
    tokens never change, so rows are only appended, at every checkpoint save (about 23 KB a
    token for SmolLM2 with a float16 cache). Row r is token r's id (int64), a CRC-32 of the
    row's other bytes (uint32), then its K and V for every layer, [2, layers, kv_heads, head_dim]
    in the cache's dtype, the same bits the run computed. The header names what the rows depend
    on: the options that set the numerics, the model's shape, the cache's dtype, shape and RoPE
    length. A file that does not match is ignored, and rows are used up to the first whose id
    differs from the checkpoint's text or whose bytes fail their checksum, so a stale, torn,
    damaged or foreign file costs a prefill from there, never a different token."""

    FAMILY = b"tokenswift-kv"  # every version's files begin so: `claim` knows them
    MAGIC = FAMILY + b" v2"  # v2: a checksum per row (v1 files are not read: a prefill instead)
    NUMERICS = ("model", "dtype", "kv_dtype", "weights", "activations", "rope_scaling", "compile", "device")
    BLOCK = 1024  # rows read at a time
    ID, CRC = 8, 4  # bytes of a row's token id and of its checksum, before its K and V

    def __init__(self, path: Path, ck: Checkpoint) -> None:
        self.path, self.ck = path, ck
        self.written: int | None = None  # rows known to be in the file and right; None: not checked

    # A cache whose sliding-window layers keep a ring (`KVCache.ring`) no longer holds their
    # older entries when it writes them: such rows carry zeros there, and this bit in their id.
    # Its files say "ring" in their header, so that only such a cache reads them, and it uses
    # rows up to a point whose last window of rows is whole.
    ABSENT = 1 << 62
    SLICE = 4096  # rows written at a time (memory: a few copies of this many rows)

    def _header(self, cache: Any, ring: bool | None = None) -> bytes:
        _, _, KH, _, D = cache.k.shape
        meta = {"numerics": {k: self.ck.options.get(k) for k in self.NUMERICS},
                "fingerprint": self.ck.model_fingerprint, "dtype": str(cache.k.dtype).removeprefix("torch."),
                "shape": [int(cache.num_layers), int(KH), int(D)], "rope_len": int(cache.rope_len)}
        if self.ck.options.get("attention_dtype", "float32") != "float32":  # absent otherwise: older files match
            meta["numerics"]["attention_dtype"] = self.ck.options["attention_dtype"]
        if cache.ringed if ring is None else ring:
            meta["ring"] = True
        body = json.dumps(meta, sort_keys=True).encode("utf-8")
        return self.MAGIC + len(body).to_bytes(8, "little") + body

    def _headers(self, cache: Any) -> list[bytes]:
        """The headers of files `cache` can read: its own, and a ring's cache also whole rows."""
        return [self._header(cache, False), self._header(cache, True)] if cache.ringed else [self._header(cache)]

    @classmethod
    def _row_bytes(cls, cache: Any) -> int:
        _, _, KH, _, D = cache.k.shape
        return cls.ID + cls.CRC + 2 * cache.num_layers * KH * D * cache.k.element_size()

    @classmethod
    def _checksums(cls, rows: Any) -> Any:
        """[n, row] uint8 -> [n] uint32: each row's CRC-32 over its id and its K/V bytes."""
        import numpy as np

        kv = cls.ID + cls.CRC
        return np.fromiter((zlib.crc32(r[kv:], zlib.crc32(r[: cls.ID])) for r in rows), dtype=np.uint32,
                           count=len(rows))

    def _scan(self, headers: list[bytes], row: int, ids: list[int], cache: Any = None) -> int:
        """How many rows from the first are right: in a file with this header, holding `ids`'
        tokens in order, each with its checksum (0 if none or no file). With `cache`, their K/V
        are copied into it as they are read, a block of rows at a time through one buffer: a
        memory map of the whole file would keep its pages resident beside the cache they fill
        (1.8 GB at 80K tokens)."""
        import numpy as np
        import torch

        try:
            f = open(self.path, "rb")
        except OSError:
            return 0
        with f:
            head = f.read(max(len(h) for h in headers))
            if not any(head[: len(h)] == h for h in headers):
                return 0
            f.seek(next(len(h) for h in headers if head[: len(h)] == h))
            n, whole_from = 0, 0  # rows [whole_from, n) have every layer's K/V
            buf = np.empty((min(self.BLOCK, max(len(ids), 1)), row), dtype=np.uint8)
            while n < len(ids):
                want = min(self.BLOCK, len(ids) - n)
                got = (f.readinto(memoryview(buf[:want]).cast("B")) or 0) // row  # a torn last row is not one
                part = buf[:got]
                have = part[:, : self.ID].copy().view(np.int64)[:, 0]
                absent = (have & self.ABSENT) != 0
                crc = part[:, self.ID : self.ID + self.CRC].copy().view("<u4")[:, 0]
                ok = ((have & ~self.ABSENT) == np.asarray(ids[n : n + got], dtype=np.int64)) & (
                    crc == self._checksums(part))
                good = int(np.argmin(ok)) if not ok.all() else got
                if absent[:good].any():
                    whole_from = n + int(np.nonzero(absent[:good])[0][-1]) + 1
                if cache is not None and good:
                    _, _, KH, _, D = cache.k.shape
                    kv = torch.from_numpy(np.ascontiguousarray(part[:good, self.ID + self.CRC :]))
                    kv = kv.view(cache.k.dtype).view(good, 2, cache.num_layers, KH, D)
                    cache.write_rows(n, kv[:, 0].permute(1, 2, 0, 3).unsqueeze(1), kv[:, 1].permute(1, 2, 0, 3).unsqueeze(1))
                n += good
                if good < want:  # a wrong row, or the file's end
                    break
            if cache is not None and n and n - whole_from < min(n, cache.window - 1):
                return 0  # the window before row n is not whole: these rows cannot start a pass
            return n

    def load(self, tokens: Any, cache: Any) -> int:
        """Fills `cache` (empty) with the file's rows for the longest prefix of `tokens` ([T] ids)
        it holds, leaving at least the last token to compute; returns how many (0: none)."""
        import torch

        ids = [int(t) for t in tokens.tolist()]
        n = self._scan(self._headers(cache), self._row_bytes(cache), ids[:-1], cache)
        self.written = n
        if n <= 0:
            return 0
        cache.pos[:n] = torch.arange(n, device=cache.pos.device)
        cache.length = n
        return n

    def append(self, cache: Any, length: int, ids: list[int]) -> None:
        """Writes the rows of entries [written, length) of `cache`, whose tokens are `ids`."""
        import numpy as np

        header, row = self._header(cache), self._row_bytes(cache)
        n = min(length, len(ids))
        if self.written is None:  # a new run or a file not yet read: keep what of it is right
            self.written = self._scan([header], row, ids[:n])
        a = min(self.written, n)
        try:
            if a == 0:
                with open(self.path, "wb") as f:
                    f.write(header)
            if n <= a:
                return
            with open(self.path, "r+b") as f:
                f.seek(len(header) + a * row)
                # a slice of rows at a time: a resumed 100K-token run appends all its rows at once,
                # and their copies here would otherwise be several times the cache
                for a0 in range(a, n, self.SLICE):
                    a1 = min(n, a0 + self.SLICE)
                    k, v, held = cache.rows(a0, a1)  # [L, 1, KH, T, D]
                    kv = _kv_bytes(k[:, 0].permute(2, 0, 1, 3), v[:, 0].permute(2, 0, 1, 3))  # [T, 2, L, KH, D] bytes
                    id_col = np.asarray(ids[a0:a1], dtype=np.int64)
                    id_col[: held - a0] |= self.ABSENT
                    out = np.empty((a1 - a0, row), dtype=np.uint8)
                    out[:, : self.ID] = id_col.view(np.uint8).reshape(a1 - a0, self.ID)
                    out[:, self.ID + self.CRC :] = kv.reshape(a1 - a0, -1)
                    out[:, self.ID : self.ID + self.CRC] = \
                        self._checksums(out).astype("<u4").view(np.uint8).reshape(a1 - a0, -1)
                    f.write(out.data)
                f.truncate()  # rows past these were another continuation's
        except OSError as e:
            raise ValueError(f"cannot write the checkpoint's KV rows {self.path}: {e.strerror or e}") from None
        self.written = n

    def remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


def _kv_bytes(k: Any, v: Any) -> Any:
    """[T, L, KH, D] twice -> [T, 2, L, KH, D] on the CPU, as a uint8 numpy view of its bytes."""
    import torch

    kv = torch.stack((k, v), dim=1).cpu().contiguous()
    return kv.view(torch.uint8).numpy()


def save_to(ck: Checkpoint, path: str | os.PathLike[str]) -> None:
    """`ck.save(path)`, with a filesystem's refusal (a directory, read-only, full) said in one
    line as a ValueError naming the path."""
    try:
        ck.save(path)
    except OSError as e:
        raise ValueError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None


def model_fingerprint(cfg: Any) -> dict[str, Any]:
    """What must match for a checkpoint's tokens to continue on a model: its shape and context."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "layers": cfg.num_layers,
            "context_length": cfg.context_length}


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` so that readers (and a crash) see the old or the new file whole."""
    tmp = path.with_name(f".{path.name}.tmp")  # one fixed name: a killed writer leaves no litter behind
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a rename refused, Ctrl-C: leave nothing behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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
