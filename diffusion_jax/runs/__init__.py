"""The edge: the only package that reads a whole config. Validate it, build the objects of a
run from its sections, and train, sample or evaluate (`diffusion_jax.main` calls these)."""
