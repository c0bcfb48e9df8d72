"""The machine and a run's outputs: the device mesh and sharding (multi-host included), XLA
compilation, host memory, the metrics writer and pictures of samples."""
