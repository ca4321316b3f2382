"""grain input pipelines: SFT token batches (bucketed or packed) and RL record batches.

Order of operations, identical on every process (so every process must pass the same seed):
  records -> global shuffle (reseeded each epoch by grain) -> repeat(num_epochs)
          -> this process's slice ds[shard_index::shard_count] -> tokenize -> batch.
Shuffling before slicing means each epoch hands different records to each process, and all
processes see equally long streams (finite runs trim the global stream to a multiple of
shard_count, dropping at most shard_count - 1 examples of the last epoch). Slicing is lazy, so a
process only reads and tokenizes its own records.

SFT batch layout, every array int32 [B, T]:
  input_ids       tokens, ``pad_id`` on padding.
  targets         next token of the same segment: targets[b, t] = input_ids[b, t + 1]; pad_id
                  where t + 1 is padding or starts another packed segment.
  loss_mask       aligned to INPUT positions: 1 where targets[b, t] is an assistant/target token.
                  So loss = sum(CE(logits[b, t], targets[b, t]) * loss_mask) / sum(loss_mask),
                  with no shifting in the loss and nothing leaking across packed segments.
  segment_ids     1..n for the n sequences in a row, 0 on padding; attention between i and j
                  is allowed iff segment_ids match, are non-zero, and j <= i.
  attention_mask  segment_ids > 0 (for code that only needs a padding mask).
  positions       0, 1, ... restarting at each segment (RoPE positions), 0 on padding.

Without packing, T is the smallest length bucket that fits the batch's longest example, so jit
sees only len(length_buckets) shapes. With packing, T = seq_len always. On multi-host runs
the bucketed T can differ between processes for the same step: either agree on
max T across processes (``pad_batch`` re-pads) or use packing / ``length_buckets=(seq_len,)``.

Over-long examples (prompt + target > seq_len), ``truncation``:
  "error" (default) raise DataError naming the record's file:line — nothing is silently lost.
  "left"  drop prompt tokens from the left (keeps the whole target; the chat header is lost).
  "right" drop target tokens from the right (keeps the whole prompt; the target's end is lost).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from grouprank_jax.data.records import KINDS, DataError
from grouprank_jax.tokenizer import ENDOFTEXT_ID

TokenizeFn = Callable[[Mapping[str, Any]], tuple[Sequence[int], Sequence[int]]]
TRUNCATIONS = ("error", "left", "right")
DEFAULT_PAD_ID = ENDOFTEXT_ID  # Qwen2.5 <|endoftext|>
_INT_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "attention_mask", "positions")


# ---- ordering and sharding --------------------------------------------------------------------


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _sharded_order(
    records: Sequence, seed: int, num_epochs: int | None, shard_index: int | None, shard_count: int | None
) -> grain.MapDataset:
    if len(records) == 0:
        raise DataError("no records to iterate over")
    index, count = _resolve_shard(shard_index, shard_count)
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
        usable = len(ds) // count * count
        if usable == 0:
            raise DataError(f"{len(ds)} examples cannot feed {count} processes; add data or epochs")
        ds = ds[:usable]
    return ds[index::count]


def _checked(record: Mapping[str, Any]) -> Mapping[str, Any]:
    if record.get("kind") not in KINDS:
        raise DataError(
            f"record {str(record)[:80]} is not canonical; build records with load_records() or records_from_rows()"
        )
    return record


# ---- tokenization -----------------------------------------------------------------------------


class _Tokenize:
    """record -> {"ids": int32 [L], "is_target": int32 [L]} with L <= seq_len."""

    def __init__(self, tokenize_fn: TokenizeFn, seq_len: int, truncation: str):
        self._fn, self._seq_len, self._truncation = tokenize_fn, seq_len, truncation

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        prompt, target, _ = self._tokens(record)
        return {
            "ids": np.concatenate([prompt, target]),
            "is_target": np.concatenate([np.zeros_like(prompt), np.ones_like(target)]),
        }

    def _tokens(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
        """(prompt, target) as trained after truncation, and the record's length before it."""
        where = record.get("source") or "<record>"
        prompt_ids, target_ids = self._fn(_checked(record))
        prompt = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
        target = np.asarray(target_ids, dtype=np.int32).reshape(-1)
        if prompt.size == 0 or target.size == 0:
            # An empty target trains on nothing; an empty prompt would let packing leak the
            # previous segment's last token into this one's first prediction.
            raise DataError(
                f"{where}: tokenize_fn returned {prompt.size} prompt and "
                f"{target.size} target tokens; both must be non-empty"
            )
        full = prompt.size + target.size
        prompt, target = self._fit(prompt, target, where)
        return prompt, target, full

    def _fit(self, prompt: np.ndarray, target: np.ndarray, where: str):
        total, limit = prompt.size + target.size, self._seq_len
        if total <= limit:
            return prompt, target
        if self._truncation == "left" and target.size < limit:
            return prompt[prompt.size - (limit - target.size) :], target
        if self._truncation == "right" and prompt.size < limit:
            return prompt, target[: limit - prompt.size]
        hint = {
            "error": "raise seq_len, shorten the record, or set truncation='left'/'right'",
            "left": "the target alone fills seq_len; raise seq_len",
            "right": "the prompt alone fills seq_len; raise seq_len",
        }[self._truncation]
        raise DataError(
            f"{where}: {prompt.size} prompt + {target.size} target tokens = {total} > "
            f"seq_len={limit} (truncation={self._truncation!r}); {hint}"
        )


class ChatTokenizeFn:
    """Default tokenize_fn: ChatML prompt via the tokenizer's chat template, target = output + EOT.

    ``render`` maps a canonical record to ``{"system"?, "prompt", "output"}``; it is required for
    grouprank records (pass the GroupRank prompt renderer) and optional for chat records.
    Prompt and target are encoded separately; this matches joint encoding for ChatML because the
    prompt ends in "<|im_start|>assistant\\n" and no BPE merge crosses a special token or "\\n".
    A class rather than a closure so grain worker processes can pickle it.
    """

    def __init__(self, tokenizer, render: Callable[[Mapping], Mapping] | None = None, end_of_turn: str = "<|im_end|>"):
        self.tokenizer, self.render, self.end_of_turn = tokenizer, render, end_of_turn

    def __call__(self, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        chat = self.render(record) if self.render is not None else record
        if chat.get("prompt") is None or chat.get("output") is None:
            raise DataError(
                f"{record.get('source') or '<record>'}: a {record.get('kind')} record "
                "has no prompt/output; pass render= to turn it into a chat turn"
            )
        messages = [{"role": "system", "content": chat["system"]}] if chat.get("system") else []
        messages.append({"role": "user", "content": chat["prompt"]})
        # tokenize=False then encode: transformers 5 may return a BatchEncoding when tokenizing.
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode(text, add_special_tokens=False)
        target_ids = self.tokenizer.encode(chat["output"] + self.end_of_turn, add_special_tokens=False)
        return list(prompt_ids), list(target_ids)


def chat_tokenize_fn(tokenizer, render=None, end_of_turn: str = "<|im_end|>") -> ChatTokenizeFn:
    """See ``ChatTokenizeFn``."""
    return ChatTokenizeFn(tokenizer, render, end_of_turn)


# ---- batch assembly ---------------------------------------------------------------------------


def _empty_batch(batch_size: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    batch = {k: np.zeros((batch_size, length), np.int32) for k in _INT_FIELDS}
    batch["input_ids"].fill(pad_id)
    batch["targets"].fill(pad_id)
    return batch


def _write_row(batch: dict[str, np.ndarray], row: int, examples: Sequence[Mapping]) -> None:
    start = 0
    for segment, ex in enumerate(examples, start=1):
        ids, is_target = ex["ids"], ex["is_target"]
        n, end = ids.size, start + ids.size
        batch["input_ids"][row, start:end] = ids
        # Targets and the mask stop one short of the segment end: the last token's successor
        # belongs to padding or to the next segment and must not be trained on.
        batch["targets"][row, start : end - 1] = ids[1:]
        batch["loss_mask"][row, start : end - 1] = is_target[1:]
        batch["segment_ids"][row, start:end] = segment
        batch["positions"][row, start:end] = np.arange(n, dtype=np.int32)
        start = end


def _finish(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch["attention_mask"] = (batch["segment_ids"] > 0).astype(np.int32)
    return batch


def default_length_buckets(seq_len: int, smallest: int = 256) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to seq_len, plus seq_len: log2 many jit shapes."""
    buckets, b = [], min(smallest, seq_len)
    while b < seq_len:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (seq_len,)


def _resolve_buckets(buckets: Sequence[int] | None, seq_len: int) -> tuple[int, ...]:
    if buckets is None:
        return default_length_buckets(seq_len)
    out = sorted({int(b) for b in buckets})
    if not out or out[0] <= 0 or out[-1] > seq_len:
        raise ValueError(f"length_buckets={tuple(buckets)} must be positive and <= seq_len={seq_len}")
    if out[-1] < seq_len:
        out.append(seq_len)  # every example that survives truncation must fit some bucket
    return tuple(out)


class _PadToBucket:
    """batch_fn: a list of tokenized examples -> one bucket-padded batch dict."""

    def __init__(self, buckets: tuple[int, ...], pad_id: int):
        self._buckets, self._pad_id = buckets, pad_id

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
        longest = max(ex["ids"].size for ex in examples)
        length = next(b for b in self._buckets if b >= longest)
        batch = _empty_batch(len(examples), length, self._pad_id)
        for row, ex in enumerate(examples):
            _write_row(batch, row, [ex])
        return _finish(batch)


def pad_batch(batch: Mapping[str, np.ndarray], length: int, pad_id: int = DEFAULT_PAD_ID) -> dict[str, np.ndarray]:
    """Right-pad an SFT batch to T = length, e.g. to the max T agreed across processes."""
    current = batch["input_ids"].shape[1]
    if length < current:
        raise ValueError(f"cannot pad a batch of length {current} down to {length}")
    out = {}
    for key, value in batch.items():
        fill = pad_id if key in ("input_ids", "targets") else 0
        out[key] = np.pad(value, ((0, 0), (0, length - current)), constant_values=fill)
    return out


# ---- greedy packing ---------------------------------------------------------------------------


class _PackedBatches(grain.IterDataset):
    """Greedily packs consecutive examples into [batch_size, seq_len] rows."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, batch_size: int, pad_id: int, drop_remainder: bool):
        super().__init__(parent)
        self._args = (seq_len, batch_size, pad_id, drop_remainder)

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(self._parent.__iter__(), *self._args)


class _PackedBatchIterator(grain.DatasetIterator):
    """A row closes when the next example does not fit; that example opens the next row.

    Only that one look-ahead example is ever buffered, so the checkpoint state is just the
    parent's state from *before* it was read: restoring re-reads it, which makes resume exact
    without serialising token arrays.
    """

    def __init__(self, parent, seq_len: int, batch_size: int, pad_id: int, drop_remainder: bool):
        super().__init__(parent)
        self._seq_len, self._batch_size = seq_len, batch_size
        self._pad_id, self._drop_remainder = pad_id, drop_remainder
        self._pending = None  # look-ahead example that did not fit into the last batch
        self._pending_state = None  # parent state before _pending was read

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[list[Mapping]] = [[]]
        used = 0
        while True:
            if self._pending is not None:
                example, before = self._pending, self._pending_state
                self._pending = None
            else:
                before = self._parent.get_state()
                try:
                    example = next(self._parent)
                except StopIteration:
                    break
            size = example["ids"].size
            if used + size > self._seq_len:
                if len(rows) == self._batch_size:
                    self._pending, self._pending_state = example, before
                    return self._assemble(rows)
                rows.append([])
                used = 0
            rows[-1].append(example)
            used += size
        # The parent is exhausted: emit what is left, as a short batch padded with empty rows.
        if not rows[0] or (self._drop_remainder and len(rows) < self._batch_size):
            raise StopIteration
        return self._assemble(rows)

    def _assemble(self, rows: list[list[Mapping]]) -> dict[str, np.ndarray]:
        batch = _empty_batch(self._batch_size, self._seq_len, self._pad_id)
        for row, examples in enumerate(rows):
            _write_row(batch, row, examples)
        return _finish(batch)

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": copy.deepcopy(parent)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._pending = self._pending_state = None


# ---- public pipelines -------------------------------------------------------------------------


def sft_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenize_fn: TokenizeFn,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    packing: bool = False,
    length_buckets: Sequence[int] | None = None,
    truncation: str = "error",
    pad_id: int = DEFAULT_PAD_ID,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Per-process SFT batches (layout in the module doc); ``batch_size`` is per process.

    ``records`` are canonical (``load_records``/``records_from_rows``); shard defaults are
    jax.process_index()/process_count(). ``num_epochs=None`` repeats forever: drive training by
    step count, since packed streams yield data-dependent batch counts per process.
    ``iter(ds)`` supports ``get_state()``/``set_state()`` for exact resume. ``read_options``
    sets grain's prefetch threads, which run tokenize_fn in parallel (None: grain's defaults).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}; choose one of {TRUNCATIONS}")
    if seq_len <= 1 or batch_size <= 0:
        raise ValueError(f"need seq_len > 1 and batch_size > 0, got {seq_len}, {batch_size}")
    buckets = _resolve_buckets(length_buckets, seq_len)
    ds = _sharded_order(records, seed, num_epochs, shard_index, shard_count)
    ds = ds.map(_Tokenize(tokenize_fn, seq_len, truncation))
    if packing:
        return _PackedBatches(ds.to_iter_dataset(read_options), seq_len, batch_size, pad_id, drop_remainder)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_PadToBucket(buckets, pad_id))
    return ds.to_iter_dataset(read_options)


def sft_token_lengths(
    records: Sequence[Mapping[str, Any]], tokenize_fn: TokenizeFn, seq_len: int, truncation: str = "error"
) -> tuple[np.ndarray, np.ndarray]:
    """([n] tokens each record trains on after ``truncation``, [n] its tokens before): one pass
    over the data before training, so an over-long record (``truncation="error"``) or a malformed
    one is named by its file:line before any model is built, and packed epochs count rows."""
    tokenize = _Tokenize(tokenize_fn, seq_len, truncation)
    kept, full = [], []
    for record in records:
        prompt, target, length = tokenize._tokens(record)
        kept.append(prompt.size + target.size)
        full.append(length)
    return np.asarray(kept, dtype=np.int64), np.asarray(full, dtype=np.int64)


def packed_rows(lengths: np.ndarray, seq_len: int) -> int:
    """Rows of ``seq_len`` tokens that one epoch of examples of these lengths fills when packed
    (a lower bound: first-fit packing leaves some room at the end of rows)."""
    return max(1, -(-int(lengths.sum()) // seq_len))


def _checked_rl(record: Mapping[str, Any]) -> Mapping[str, Any]:
    record = _checked(record)
    if record["kind"] != "grouprank" or record.get("gold") is None:
        raise DataError(
            f"{record.get('source') or '<record>'}: RL needs grouprank records with "
            "gold labels; load them with purpose='rl'"
        )
    return record


def rl_dataset(
    records: Sequence[Mapping[str, Any]],
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Per-process batches of ``batch_size`` canonical grouprank records (lists of dicts).

    Unlike SFT (records interleaved over processes), RL slices each *global* batch: step i of
    process p holds rows ``[p * batch_size, (p + 1) * batch_size)`` of the global batch
    ``shuffled[i * B : (i + 1) * B]`` with ``B = batch_size * shard_count``. The global batch
    (the concatenation over processes in process order) is therefore the same rows in the same
    order whatever the process count, which is what makes a 2-process GRPO run reproduce a
    1-process run of the same global batch (rollout seeds are tied to global row indices).
    RL tokenizes prompts itself, so records pass through untouched; incomplete global batches
    are dropped so every process runs the same number of steps.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(records) == 0:
        raise DataError("no records to iterate over")
    index, count = _resolve_shard(shard_index, shard_count)
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(num_epochs).map(_checked_rl)
    chunks = ds.batch(batch_size, drop_remainder=True, batch_fn=list)  # chunk c = global rows [c*b, (c+1)*b)
    if num_epochs is not None:
        usable = len(chunks) // count * count
        if usable == 0:
            raise DataError(f"{len(ds)} records cannot fill one global batch of {batch_size} x {count} processes")
        chunks = chunks[:usable]
    return chunks[index::count].to_iter_dataset(read_options)
