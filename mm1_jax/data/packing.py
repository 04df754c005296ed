"""Host-side sequence building: expand image markers, fit, pack, batch (numpy).

An example arrives with each image as ONE marker id in its tokens (in the
order of its images). The steps, per example:

  expand_image_markers  marker -> [start] + [marker] * M + [end]  (an "image run")
  fit_example           cut to `length` tokens / `max_images` images without
                        ever splitting a run, and never end on a run
  Packer                place fitted examples into fixed-length sequences
                        (one per sequence, or several packed, next-fit)
  stack                 sequences -> batch

The model splices image embeddings into the placeholder runs of
`decoder_input_tokens`, which are the targets shifted right by one inside each
segment. So a run must never be the last thing in an example: the shift would
drop its last placeholder (and its image would have no next token to predict
anyway). `fit_example` guarantees this; `Packer` checks it.

Sequence (one row of the batch contract of mm1_jax/data/batch.py; L = length,
N = max_images):
  decoder_target_tokens  int32 [L]  the tokens; 0 on padding
  decoder_input_tokens   int32 [L]  targets shifted right within each segment,
                                    0 at each segment's first position
  decoder_loss_weights   int32 [L]  1 where the target is trained on: its
                                    loss_mask is set and it is not a
                                    marker/start/end id; 0 on padding
  decoder_segment_ids    int32 [L]  1, 2, ... per packed example; 0 padding
  decoder_positions      int32 [L]  0, 1, ... restarting per segment; 0 padding
  images                 uint8 [N, S, S, 3]  images in order of appearance,
                                    zero-filled after the real ones
  image_mask             bool  [N]  True for the real images (a prefix)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mm1_jax.data import batch as batch_lib

PAD_ID = 0


def _special_ids(marker_id: int, start_id: int | None, end_id: int | None) -> list[int]:
  return [i for i in (marker_id, start_id, end_id) if i is not None]


def _is_special(tokens: np.ndarray, marker_id: int, start_id: int | None,
                end_id: int | None) -> np.ndarray:
  """bool [n]: True at marker/start/end ids (never trained on as targets)."""
  return np.isin(tokens, _special_ids(marker_id, start_id, end_id))


def expand_image_markers(tokens: Any, loss_mask: Any, marker_id: int, num_image_tokens: int,
                         image_start_id: int | None = None,
                         image_end_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Replaces each marker by an image run: [start] + [marker] * M + [end].

  tokens: int [n]; loss_mask: int/bool [n]. start/end are left out when their
  id is None. Returns (tokens int32 [n'], loss_mask int32 [n']) with 0 loss
  on every position of every run.
  """
  if num_image_tokens < 1:
    raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}.")
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  loss_mask = (np.asarray(loss_mask).reshape(-1) != 0).astype(np.int32)
  if tokens.shape != loss_mask.shape:
    raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} differ in length.")
  is_marker = tokens == marker_id
  run_length = num_image_tokens + (image_start_id is not None) + (image_end_id is not None)
  counts = np.where(is_marker, run_length, 1)
  expanded = np.repeat(tokens, counts)
  expanded_mask = np.repeat(np.where(is_marker, 0, loss_mask), counts).astype(np.int32)
  # Each marker's copies form one block; overwrite its first/last with start/end.
  block_begins = (np.cumsum(counts) - counts)[is_marker]
  if image_start_id is not None:
    expanded[block_begins] = image_start_id
  if image_end_id is not None:
    expanded[block_begins + run_length - 1] = image_end_id
  return expanded, expanded_mask


def expand_flags(flags: Any, tokens: Any, marker_id: int, run_length: int) -> np.ndarray:
  """bool [n] per token of unexpanded `tokens` -> bool [n'] per token after
  expand_image_markers (run_length = its tokens per image); False on runs."""
  tokens = np.asarray(tokens).reshape(-1)
  flags = np.asarray(flags, bool).reshape(-1) & (tokens != marker_id)
  return expand_per_token(flags, tokens, marker_id, run_length)


def expand_per_token(values: Any, tokens: Any, marker_id: int, run_length: int) -> np.ndarray:
  """[n] values per token of unexpanded `tokens` -> [n'] after
  expand_image_markers: each marker's value repeated over its run."""
  tokens = np.asarray(tokens).reshape(-1)
  return np.repeat(np.asarray(values).reshape(-1), np.where(tokens == marker_id, run_length, 1))


def image_runs(tokens: Any, marker_id: int, num_image_tokens: int, start_id: int | None = None,
               end_id: int | None = None) -> np.ndarray:
  """Locates the image runs of expanded tokens.

  tokens: int [n]. Returns int64 [r, 2]: (begin, end) of each run, end
  exclusive, start/end tokens included, in order. Without start/end ids,
  adjacent images form one placeholder stretch of a multiple of M, split
  every M. Raises ValueError when the tokens are not well-formed runs.
  """
  tokens = np.asarray(tokens).reshape(-1)
  is_marker = np.concatenate([[False], tokens == marker_id, [False]])
  edges = np.flatnonzero(np.diff(is_marker.astype(np.int8)))
  begins, ends = edges[::2], edges[1::2]
  bad = (ends - begins) % num_image_tokens != 0
  if bad.any():
    raise ValueError(f"a run of {int(ends[bad][0] - begins[bad][0])} placeholders at position "
                     f"{int(begins[bad][0])} is not a multiple of num_image_tokens="
                     f"{num_image_tokens}.")
  chunk_begins = np.array([b for begin, end in zip(begins, ends)
                           for b in range(begin, end, num_image_tokens)], np.int64)
  run_begins, run_ends = chunk_begins.copy(), chunk_begins + num_image_tokens
  if start_id is not None:
    _require_neighbour(tokens, run_begins - 1, start_id, "image_start")
    run_begins -= 1
  if end_id is not None:
    _require_neighbour(tokens, run_ends, end_id, "image_end")
    run_ends += 1
  return np.stack([run_begins, run_ends], axis=1).reshape(-1, 2)


def _require_neighbour(tokens: np.ndarray, where: np.ndarray, token_id: int, name: str) -> None:
  """Every placeholder block has token_id at `where`, and there are no strays."""
  inside = (where >= 0) & (where < len(tokens))
  ok = inside & (tokens[np.clip(where, 0, max(len(tokens) - 1, 0))] == token_id)
  if not ok.all():
    raise ValueError(f"the image placeholders next to position {int(where[~ok][0])} lack their "
                     f"{name} token ({token_id}).")
  if np.count_nonzero(tokens == token_id) != len(where):
    raise ValueError(f"{name} token {token_id} appears outside image runs.")


def _placeholders_per_image(tokens: np.ndarray, marker_id: int, num_images: int) -> int:
  """M as the example implies it: its placeholders / its images (0 if none)."""
  num_placeholders = int(np.count_nonzero(tokens == marker_id))
  if num_images == 0 and num_placeholders == 0:
    return 0
  if num_images == 0 or num_placeholders == 0 or num_placeholders % num_images:
    raise ValueError(f"the tokens hold {num_placeholders} placeholder(s) for {num_images} "
                     f"image(s); expand the markers first, one run per image.")
  return num_placeholders // num_images


def fit_example(tokens: Any, loss_mask: Any, images: Any, length: int, max_images: int,
                marker_id: int, start_id: int | None = None, end_id: int | None = None,
                num_image_tokens: int | None = None, cut_after: Any = None,
                image_group: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts an expanded example to fit `length` tokens and `max_images` images.

  tokens: int [n]; loss_mask: [n]; images: [k, ...] with k == number of runs.
  num_image_tokens: M; None = placeholders / k (pass it when known: without
  start/end ids it is what splits touching runs, and it is checked).
  cut_after: bool [n] or None: the only places a cut may follow (a
  conversation's turn ends: never inside an answer); None = anywhere.
  image_group: int [n] or None: which image each token belongs to (-1 for
  text), when one image spans several runs (high-resolution sub-images and
  their row-end tokens, mm1_jax/data/image_split.py); None = each run is
  its own image.
  Never splits an image (a run, or a group of them):
    1. more than max_images runs: cut right before the image holding the
       (max_images+1)-th run;
    2. longer than length: cut at length, or before the image the cut falls in;
    3. with cut_after: move the cut back to the last allowed place;
    4. drop trailing images (a run needs a next token; see module docstring).
  Returns (tokens int32 [n'], loss_mask int32 [n'], images [k', ...]) with
  n' <= length and images a prefix. n' may be 0 (nothing usable is left).
  """
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  loss_mask = (np.asarray(loss_mask).reshape(-1) != 0).astype(np.int32)
  images = np.asarray(images)
  if tokens.shape != loss_mask.shape:
    raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} differ in length.")
  if num_image_tokens is None:
    num_image_tokens = _placeholders_per_image(tokens, marker_id, len(images)) or 1
  runs = image_runs(tokens, marker_id, num_image_tokens, start_id, end_id)
  if len(runs) != len(images):
    raise ValueError(f"the tokens hold {len(runs)} image run(s) but the example has "
                     f"{len(images)} image(s).")
  if image_group is None:
    group = np.full(len(tokens), -1, np.int64)
    for index, (begin, end) in enumerate(runs):
      group[begin:end] = index
  else:
    group = np.asarray(image_group, np.int64).reshape(-1)
    if group.shape != tokens.shape:
      raise ValueError(f"image_group {group.shape} and tokens {tokens.shape} differ in length.")
  # First token of each image (groups are contiguous and numbered in order).
  in_image = np.flatnonzero(group >= 0)
  ids, first = np.unique(group[in_image], return_index=True)
  group_begin = dict(zip(ids.tolist(), in_image[first].tolist()))

  def before_image(cut: int) -> int:
    """`cut`, or the start of the image it would fall inside."""
    if 0 < cut < len(tokens) and group[cut] >= 0 and group[cut - 1] == group[cut]:
      return group_begin[int(group[cut])]
    return cut

  cut = len(tokens)
  if len(runs) > max_images:
    cut = before_image(int(runs[max_images, 0]))
  if cut > length:
    cut = before_image(length)
  if cut < len(tokens) and cut_after is not None:
    allowed = np.flatnonzero(np.asarray(cut_after, bool).reshape(-1)[:cut]) + 1
    cut = int(allowed[-1]) if len(allowed) else 0
  # A loop: dropping an image leaves the one before it trailing when they touch.
  while cut and group[cut - 1] >= 0:
    cut = group_begin[int(group[cut - 1])]
  num_kept = int(np.count_nonzero(runs[:, 1] <= cut))
  return tokens[:cut], loss_mask[:cut], images[:num_kept]


class Packer:
  """Turns fitted examples into fixed-length sequences (see module docstring).

  length: L; max_images: N; image_shape: (S, S, 3); marker_id, start_id,
  end_id: the run ids (start/end None = unused); pack: several examples per
  sequence (next-fit, in order, never split) or one each; num_image_tokens:
  M, to check each example has exactly M placeholders per image (None: only
  that the placeholders divide evenly among its images).

  Example: dict with tokens int [n] (1 <= n <= L; empty examples are
  skipped), loss_mask [n], images uint8 [k, S, S, 3] (k <= N; may be left
  out when k = 0), as produced by expand_image_markers + fit_example.
  """

  def __init__(self, length: int, max_images: int, image_shape: Sequence[int], marker_id: int,
               start_id: int | None = None, end_id: int | None = None, pack: bool = True,
               num_image_tokens: int | None = None):
    ids = _special_ids(marker_id, start_id, end_id)
    if PAD_ID in ids or len(set(ids)) != len(ids):
      raise ValueError(f"marker/start/end ids must differ from each other and from the pad id "
                       f"{PAD_ID}, got marker={marker_id}, start={start_id}, end={end_id}.")
    if length < 1 or max_images < 0 or (num_image_tokens is not None and num_image_tokens < 1):
      raise ValueError(f"need length >= 1, max_images >= 0, num_image_tokens >= 1; got "
                       f"{length}, {max_images}, {num_image_tokens}.")
    self.length, self.max_images = int(length), int(max_images)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.marker_id, self.start_id, self.end_id = marker_id, start_id, end_id
    self.num_image_tokens = num_image_tokens
    self.pack = bool(pack)
    self._pending: list[dict[str, np.ndarray]] = []  # examples of the open sequence

  # --- streaming -------------------------------------------------------------

  def add(self, example: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """Adds one example; returns the sequences it finished (0, 1 or 2)."""
    example = self._checked(example)
    if not len(example["tokens"]):
      return []
    if not self.pack:
      return [self._build([example])]
    finished = []
    if self._pending and not self._fits(example):
      finished.append(self._finish())
    self._pending.append(example)
    # A full sequence cannot take any (non-empty) example: emit it now.
    if self._num_tokens() == self.length:
      finished.append(self._finish())
    return finished

  def flush(self) -> list[dict[str, np.ndarray]]:
    """Finishes the open sequence, if any (end of data)."""
    return [self._finish()] if self._pending else []

  def empty_sequence(self) -> dict[str, np.ndarray]:
    """An all-padding sequence (fills the last batch of a finite split)."""
    return self._build([])

  def _fits(self, example: Mapping[str, np.ndarray]) -> bool:
    return (self._num_tokens() + len(example["tokens"]) <= self.length and
            self._num_images() + len(example["images"]) <= self.max_images)

  def _num_tokens(self) -> int:
    return sum(len(e["tokens"]) for e in self._pending)

  def _num_images(self) -> int:
    return sum(len(e["images"]) for e in self._pending)

  def _finish(self) -> dict[str, np.ndarray]:
    sequence = self._build(self._pending)
    self._pending = []
    return sequence

  # --- checks and layout -----------------------------------------------------

  def _checked(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The example as int32/uint8 arrays; ValueError if it would misalign."""
    tokens = np.asarray(example["tokens"], np.int32).reshape(-1)
    loss_mask = (np.asarray(example["loss_mask"]).reshape(-1) != 0).astype(np.int32)
    images = example.get("images")
    images = (np.zeros((0, *self.image_shape), np.uint8) if images is None
              else np.asarray(images))
    if images.size == 0:
      images = np.zeros((0, *self.image_shape), np.uint8)
    if tokens.shape != loss_mask.shape:
      raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} differ.")
    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      raise ValueError(f"images must be uint8 [k, {', '.join(map(str, self.image_shape))}], got "
                       f"{images.dtype} {images.shape}.")
    if len(tokens) > self.length or len(images) > self.max_images:
      raise ValueError(f"example with {len(tokens)} tokens and {len(images)} images exceeds "
                       f"length={self.length} / max_images={self.max_images}; call fit_example.")
    per_image = _placeholders_per_image(tokens, self.marker_id, len(images))
    if self.num_image_tokens is not None and per_image not in (0, self.num_image_tokens):
      raise ValueError(f"example has {per_image} placeholders per image, expected "
                       f"{self.num_image_tokens}.")
    if len(tokens) and _is_special(tokens[-1:], self.marker_id, self.start_id, self.end_id)[0]:
      raise ValueError("example ends inside an image run; call fit_example.")
    return {"tokens": tokens, "loss_mask": loss_mask, "images": images}

  def _build(self, examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Lays examples out as one sequence (module docstring's contract)."""
    seq = batch_lib.empty_sequence(self.length, self.max_images, self.image_shape)
    offset = slot = 0
    for segment, example in enumerate(examples, start=1):
      tokens, n = example["tokens"], len(example["tokens"])
      span = slice(offset, offset + n)
      seq["decoder_target_tokens"][span] = tokens
      # Shift right inside the segment: its first input stays 0 (acts as BOS).
      seq["decoder_input_tokens"][offset + 1:offset + n] = tokens[:-1]
      trained = (example["loss_mask"] != 0) & ~_is_special(tokens, self.marker_id,
                                                            self.start_id, self.end_id)
      seq["decoder_loss_weights"][span] = trained
      seq["decoder_segment_ids"][span] = segment
      seq["decoder_positions"][span] = np.arange(n)
      k = len(example["images"])
      seq["images"][slot:slot + k] = example["images"]
      seq["image_mask"][slot:slot + k] = True
      offset, slot = offset + n, slot + k
    return seq

  # --- checkpointing ---------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    """The open sequence as numpy arrays and ints (e.g. for np.savez).

    tokens int32 [n], loss_mask int32 [n], images uint8 [m, S, S, 3]: the
    pending examples concatenated; segment_lengths int32 [s] and
    segment_num_images int32 [s] split them; length, max_images: to refuse a
    mismatched restore.
    """
    pending = self._pending
    return {
        "tokens": np.concatenate([e["tokens"] for e in pending] + [np.zeros(0, np.int32)]),
        "loss_mask": np.concatenate([e["loss_mask"] for e in pending] + [np.zeros(0, np.int32)]),
        "images": np.concatenate([e["images"] for e in pending] +
                                 [np.zeros((0, *self.image_shape), np.uint8)]),
        "segment_lengths": np.array([len(e["tokens"]) for e in pending], np.int32),
        "segment_num_images": np.array([len(e["images"]) for e in pending], np.int32),
        "length": self.length,
        "max_images": self.max_images,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores the open sequence saved by get_state (replacing the current one)."""
    if int(state["length"]) != self.length or int(state["max_images"]) != self.max_images:
      raise ValueError(f"state is for length={int(state['length'])}, max_images="
                       f"{int(state['max_images'])}; this packer has {self.length}, "
                       f"{self.max_images}.")
    token_ends = np.cumsum(state["segment_lengths"])
    image_ends = np.cumsum(state["segment_num_images"])
    pending = []
    for i in range(len(token_ends)):
      t0, i0 = (token_ends[i - 1], image_ends[i - 1]) if i else (0, 0)
      pending.append(self._checked({
          "tokens": state["tokens"][t0:token_ends[i]],
          "loss_mask": state["loss_mask"][t0:token_ends[i]],
          "images": state["images"][i0:image_ends[i]]}))
    self._pending = pending


def stack(sequences: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Sequences -> batch: each key stacked to [B, ...]."""
  if not sequences:
    raise ValueError("stack needs at least one sequence.")
  return {key: np.stack([s[key] for s in sequences]) for key in sequences[0]}


def unpack(sequence: Mapping[str, np.ndarray], marker_id: int,
           num_image_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
  """Splits one sequence back into its examples (tests, debugging).

  Returns, per segment in order, tokens int32 [n], loss_mask int32 [n] (the
  loss weights, i.e. the original loss_mask with marker/start/end zeroed) and
  images uint8 [k, S, S, 3], k = its placeholders / M. num_image_tokens: M;
  None = all placeholders / real images of the sequence.
  """
  segment_ids = np.asarray(sequence["decoder_segment_ids"])
  if num_image_tokens is None:
    num_image_tokens = _placeholders_per_image(
        np.asarray(sequence["decoder_target_tokens"]), marker_id,
        int(np.count_nonzero(sequence["image_mask"]))) or 1
  examples, slot = [], 0
  for segment in range(1, int(segment_ids.max(initial=0)) + 1):
    where = segment_ids == segment
    tokens = np.asarray(sequence["decoder_target_tokens"])[where]
    k = int(np.count_nonzero(tokens == marker_id)) // num_image_tokens
    examples.append({"tokens": tokens,
                     "loss_mask": np.asarray(sequence["decoder_loss_weights"])[where],
                     "images": np.asarray(sequence["images"])[slot:slot + k]})
    slot += k
  if slot != int(np.count_nonzero(sequence["image_mask"])):
    raise ValueError(f"segments hold {slot} image(s) but image_mask marks "
                     f"{int(np.count_nonzero(sequence['image_mask']))}.")
  return examples
