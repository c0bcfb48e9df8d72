"""Shuffled, sharded, batched and exactly resumable iteration over a data set, with grain.

Every example is a pure function of its position n = 0, 1, 2, ... in the global stream:
  epoch e = n // N (N examples in the split); the example is number pi_e(n mod N) of the
  split, pi_e a permutation drawn by grain's index shuffle with seed s + e (identity when
  not shuffling); with `data.random_crop` its square window is placed by a Philox draw keyed
  by (crop seed, n); it is mirrored left-right iff a Philox draw keyed by (flip seed, n) is
  below 1/2; a templated caption is drawn with (template seed, n) (`caption_templates.py`),
  and a caption is dropped iff a draw keyed by (dropout seed, n) is below
  `data.caption_dropout` (`captions.py`). Captions are tokenized per batch.
Global batch k is positions [kG, (k+1)G); process p of P takes positions kG + p + jP,
j < G/P, so the P shards are disjoint, their union is the global batch, and the global
batch sequence does not depend on P. Nothing is stateful, so the iterator's state is the
number of batches it has yielded: after `set_state` it yields bitwise what the
uninterrupted iterator would have yielded (across epochs and flips), even on another
number of processes.
"""

import copy
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from diffusion_jax.data import image_ops
from diffusion_jax.data.caption_templates import TemplateCaption, class_names_or_numbers
from diffusion_jax.data.captions import CaptionDropout, TokenizeCaptions, Tokenizer
from diffusion_jax.data.registry import build_source
from diffusion_jax.data.sources import DataSource

# Batches read ahead by threads in the process that consumes them.
_READ_THREADS = 4
_PREFETCH_BATCHES = 8


def local_batch_size(
    global_batch_size: int, process_count: int, *, option: str = "training.batch_size"
) -> int:
    """Examples per batch on each process: the global batch split evenly across processes."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"{option}={global_batch_size} must be a positive multiple of the "
            f"number of processes ({process_count}); allowed: multiples of {process_count}"
        )
    return global_batch_size // process_count


def _random_horizontal_flip(example: dict, rng: np.random.Generator) -> dict:
    """Mirrors the image [H, W, C] left-right with probability 1/2."""
    if rng.random() < 0.5:
        return {**example, "x": example["x"][:, ::-1]}
    return example


def _random_crop(example: dict, rng: np.random.Generator) -> dict:
    """A square window of the image [H, W, C] (shorter side S) at a random offset."""
    return {**example, "x": image_ops.random_square_crop(example["x"], rng)}


def _stack_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def example_stream(
    source: DataSource,
    *,
    seed: int,
    shuffle: bool,
    random_flip: bool,
    num_epochs: int | None,
    random_crop: bool = False,
    caption_templates: tuple[str, ...] = (),
    caption_dropout: float = 0.0,
) -> grain.MapDataset:
    """The global stream of examples (see the module docstring); infinite if num_epochs is None."""
    # The first two seeds are those of the streams before crops and captions existed.
    shuffle_seed, flip_seed, crop_seed, template_seed, dropout_seed = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(5)
    )
    stream = grain.MapDataset.source(source)
    if shuffle:
        stream = stream.shuffle(seed=shuffle_seed)  # epoch e uses seed shuffle_seed + e
    stream = stream.repeat(num_epochs)
    if random_crop:
        stream = stream.random_map(_random_crop, seed=crop_seed)
    if random_flip:
        stream = stream.random_map(_random_horizontal_flip, seed=flip_seed)  # keyed by n
    if caption_templates:
        names = class_names_or_numbers(source.class_names, source.num_classes)
        stream = stream.random_map(TemplateCaption(caption_templates, names), seed=template_seed)
    if caption_dropout:
        stream = stream.random_map(CaptionDropout(caption_dropout), seed=dropout_seed)
    return stream


def shard_and_batch(
    stream: grain.MapDataset,
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """Batches of this process: batch k holds positions kG + process_index + jP of `stream`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
    batch_size = local_batch_size(global_batch_size, process_count)
    # A finite stream is cut to whole global batches, so every process yields as many.
    stream = stream[: len(stream) // global_batch_size * global_batch_size]
    shard = stream[process_index::process_count]
    return shard.batch(batch_size, drop_remainder=True, batch_fn=_stack_examples)


def shard_positions(
    batch_index: int, *, global_batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """Positions in the stream of the rows of this process's batch `batch_index` (the layout
    of `shard_and_batch`), to put rows gathered from every process back in stream order."""
    batch_size = local_batch_size(global_batch_size, process_count)
    return batch_index * global_batch_size + process_index + process_count * np.arange(batch_size)


class DataIterator:
    """Iterator of batches {"x": float32 [B, ...] in [-1, 1] (images), "label": int32 [B]}.

    "label" is present when `use_labels`; of captioned data, "input_ids" int32 [B, L] when a
    tokenizer is given and "text" (the captions, a NumPy array of str [B]: not a JAX type, for
    logging) when `keep_text`. Its state is {"next_batch_index": k, ...}, a JSON-serialisable
    dict; `set_state` checks it was taken from the same data stream.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        *,
        is_image: bool,
        use_labels: bool,
        num_workers: int,
        stream_identity: dict[str, Any],
        passed_keys: tuple[str, ...] = (),
    ):
        self._batches = batches
        self._is_image = is_image
        self._use_labels = use_labels
        self._passed_keys = passed_keys
        self._num_workers = num_workers
        self._stream_identity = stream_identity
        self._next_batch_index = 0
        self._iterator = None

    def __iter__(self) -> "DataIterator":
        return self

    def __len__(self) -> int:
        """Number of batches per process (sys.maxsize // B for an endless stream)."""
        return len(self._batches)

    @property
    def num_examples(self) -> int:
        """Examples in one pass over the split."""
        return self._stream_identity["num_examples"]

    def _start_reading(self, batch_index: int):
        batches = self._batches[batch_index:].to_iter_dataset(
            grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
        )
        if self._num_workers > 0:
            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
                flags.FLAGS.mark_as_parsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(self._num_workers))
        return iter(batches)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start_reading(self._next_batch_index)
        raw = next(self._iterator)
        self._next_batch_index += 1
        x = raw["x"].astype(np.float32)
        if self._is_image:
            x = x / np.float32(127.5) - np.float32(1.0)  # [0, 255] -> [-1, 1]
        batch = {"x": x}
        if self._use_labels:
            batch["label"] = raw["label"].astype(np.int32)
        for key in self._passed_keys:
            batch[key] = raw[key]
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch_index": self._next_batch_index, **self._stream_identity}

    def set_state(self, state: dict[str, Any]) -> None:
        for key, value in self._stream_identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data iterator state has {key}={state.get(key)!r}, but this iterator has "
                    f"{key}={value!r}: the state belongs to another data stream"
                )
        self.close()
        self._next_batch_index = int(state["next_batch_index"])

    def close(self) -> None:
        """Stops the reader threads/processes; iteration restarts lazily where it stood."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def _stream_identity(data_config, source: DataSource, **arguments) -> dict[str, Any]:
    """What a saved iterator state must agree on; the crop and caption options only where set,
    so states saved before they existed still restore."""
    identity = {
        "dataset": data_config.name,
        "split": arguments["split"],
        "num_examples": len(source),
        "seed": arguments["seed"],
        "shuffle": arguments["shuffle"],
        "random_flip": bool(data_config.random_flip),
        "global_batch_size": arguments["global_batch_size"],
    }
    if data_config.random_crop:
        identity["random_crop"] = True
    if data_config.caption_templates:
        identity["caption_templates"] = list(data_config.caption_templates)
    if data_config.caption_dropout:
        identity["caption_dropout"] = float(data_config.caption_dropout)
    return identity


def _caption_batches(
    batches: grain.MapDataset, *, has_captions: bool, tokenizer: Tokenizer | None, keep_text: bool
) -> tuple[grain.MapDataset, tuple[str, ...]]:
    """`batches` with "input_ids" where captions and a tokenizer exist; the caption keys the
    iterator yields ("text" only with `keep_text`: strings are not JAX types)."""
    if not has_captions:
        return batches, ()
    passed_keys = ("text",) if keep_text else ()
    if tokenizer is not None:
        batches = batches.map(TokenizeCaptions(tokenizer))
        passed_keys += ("input_ids",)
    return batches, passed_keys


def make_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    pad_last_batch: bool = False,
    tokenizer: Tokenizer | None = None,
    keep_text: bool = False,
) -> DataIterator:
    """This process's batches of `split`: G / P examples each, disjoint across processes.

    Random flips follow `data.random_flip`; labels `data.use_labels`; crops and captions the
    `data.random_crop` and `data.caption_*` options. An endless stream when `num_epochs` is
    None; otherwise `num_epochs` passes, cut to whole global batches, or, with
    `pad_last_batch`, completed to whole global batches by the examples that follow in the
    stream (positions >= num_epochs * num_examples, for the caller to drop). Of captioned
    data, batches hold "input_ids" when a `tokenizer` is given (`captions.py`), "text" with
    `keep_text`, and no caption otherwise.
    """
    local_batch_size(global_batch_size, process_count)  # fail early, naming the option
    source = build_source(data_config, split=split)
    length = None if num_epochs is None else num_epochs * len(source)
    if pad_last_batch:
        if length is None:
            raise ValueError("pad_last_batch needs a finite stream (num_epochs)")
        length = -(-length // global_batch_size) * global_batch_size
    stream = example_stream(
        source,
        seed=seed,
        shuffle=shuffle,
        random_flip=data_config.random_flip,
        num_epochs=None if length is None else -(-length // len(source)),
        random_crop=data_config.random_crop,
        caption_templates=tuple(data_config.caption_templates),
        caption_dropout=data_config.caption_dropout,
    )
    if length is not None:
        stream = stream[:length]
    batches = shard_and_batch(
        stream,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    batches, passed_keys = _caption_batches(
        batches, has_captions=source.has_captions or bool(data_config.caption_templates),
        tokenizer=tokenizer, keep_text=keep_text,
    )  # fmt: skip
    identity = _stream_identity(data_config, source, split=split, seed=seed, shuffle=shuffle,
                                global_batch_size=global_batch_size)  # fmt: skip
    return DataIterator(
        batches,
        is_image=source.is_image,
        use_labels=data_config.use_labels,
        num_workers=data_config.num_workers,
        stream_identity=identity,
        passed_keys=passed_keys,
    )


def make_eval_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    seed: int,
    global_batch_size: int,
    pad_last_batch: bool = False,
    tokenizer: Tokenizer | None = None,
    keep_text: bool = False,
) -> DataIterator:
    """One pass over `split` in order, unflipped, center-cropped, without caption dropout, in
    this process's share of each batch: whole batches only, or every example with
    `pad_last_batch` (see `make_dataset`)."""
    local_batch_size(global_batch_size, jax.process_count(), option="eval.batch_size")
    unflipped = copy.deepcopy(data_config)
    with unflipped.unlocked():
        unflipped.random_flip = False
        unflipped.random_crop = False
        unflipped.caption_dropout = 0.0
    return make_dataset(
        unflipped,
        split=split,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        shuffle=False,
        num_epochs=1,
        pad_last_batch=pad_last_batch,
        tokenizer=tokenizer,
        keep_text=keep_text,
    )
