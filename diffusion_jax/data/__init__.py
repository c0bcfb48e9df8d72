"""Input pipelines: data sets (TFDS, digits, 2-D toys, image folders) -> resumable batches.

`make_dataset(data_config, split=..., seed=..., global_batch_size=...)` returns a
`DataIterator` of {"x": float32 [B, ...] in [-1, 1], "label": int32 [B]} with exact
`get_state`/`set_state`; of captioned data (`captioned_folder.py`, a TFDS text feature,
`caption_templates.py`), also "input_ids" from a tokenizer handed to it and "text"
(`captions.py`). `DATASETS` maps the names allowed in `data.name` to builders.
"""

from diffusion_jax.data.pipeline import (
    DataIterator,
    local_batch_size,
    make_dataset,
    make_eval_dataset,
    shard_positions,
)
from diffusion_jax.data.registry import (
    DATASETS,
    DatasetInfo,
    build_source,
    check_options,
    dataset_info,
)
from diffusion_jax.data.sources import DataSource

__all__ = [
    "DATASETS",
    "DataIterator",
    "DataSource",
    "DatasetInfo",
    "build_source",
    "check_options",
    "dataset_info",
    "local_batch_size",
    "make_dataset",
    "make_eval_dataset",
    "shard_positions",
]
