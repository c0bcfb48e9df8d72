"""PyTorch weights in: converters from other projects' files to ours (the FID Inception of
pytorch-fid today). With the benchmark, the only place that imports torch."""
