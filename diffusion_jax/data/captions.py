"""The caption stages of the input pipeline: caption dropout and tokenization.

Caption dropout (classifier-free guidance, Ho & Salimans 2022; as Stable Diffusion's
fine-tuning does it): with probability `data.caption_dropout` an example's caption is replaced
by the empty string "", decided by a Philox generator keyed by (the stream's seed, position n),
so by (seed, epoch, example) and exactly again after a resume.

Tokenization: the data package does not import `models/` (README, the package table), so it
does not build a tokenizer; the edge hands `make_dataset` one, any callable
`tokenizer(list_of_captions) -> int [B, L]` (`models.text.tokenizer.CLIPTokenizer` is one:
bos + tokens + eos, padded to 77). It is applied to each batch of captions in the reader
threads (or grain worker processes, for which it must be picklable), after dropout, so a
dropped caption is the tokens of "".
"""

from collections.abc import Callable, Sequence

import numpy as np

Tokenizer = Callable[[Sequence[str]], np.ndarray]


class CaptionDropout:
    """(example with "text", rng) -> the example, its caption "" with probability `rate`."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        if rng.random() < self.rate:
            return {**example, "text": ""}
        return example


class TokenizeCaptions:
    """A batch with "text" [B] -> the batch with "input_ids" int32 [B, L] of `tokenizer`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(text) for text in batch["text"]]
        input_ids = np.asarray(self.tokenizer(captions))
        if input_ids.ndim != 2 or len(input_ids) != len(captions):
            raise ValueError(
                f"the tokenizer gave an array of shape {input_ids.shape} for {len(captions)} "
                "captions; allowed: [number of captions, max_length]"
            )
        return {**batch, "input_ids": input_ids.astype(np.int32)}
