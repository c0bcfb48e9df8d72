"""The mathematics of diffusion models, arrays and plain arguments only (no config, no files):
beta and noise schedules, the forward process, parameterizations, losses, the variational
bound, likelihoods, timestep sampling and an analytic Gaussian mixture."""
