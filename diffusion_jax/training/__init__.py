"""The training system, config-free: the train state, the pure train step, the optimizer,
checkpoints and the loop. `runs/train.py` builds these from a config."""
