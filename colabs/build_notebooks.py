"""Writes the notebooks of colabs/ from the cell sources below, without outputs.

    python colabs/build_notebooks.py

Edit the cells here, not in the .ipynb files: the notebooks are generated (stored without
outputs, as tests/colabs_test.py checks) so that a review reads Python, not JSON.
"""

from __future__ import annotations

import pathlib
import textwrap

import nbformat

COLABS_DIR = pathlib.Path(__file__).resolve().parent
COLAB_URL = "https://colab.research.google.com/github/{org_repo}/blob/main/colabs/{name}.ipynb"
ORG_REPO = "diffusion-jax/diffusion_jax"  # placeholder, as REPO_URL in the setup cell


def md(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(source).strip())


def code(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(textwrap.dedent(source).strip())


def badge(name: str) -> str:
    url = COLAB_URL.format(org_repo=ORG_REPO, name=name)
    return f"[![Open {name} in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


# ---------------------------------------------------------------- cells every notebook shares

SETUP = code(
    f"""
    # Setup. In Colab: clone the repository and install it (the configs live at its root).
    # Locally, in a checkout: nothing to install; the repository root is found from here.
    import os
    import pathlib
    import subprocess
    import sys

    REPO_URL = "https://github.com/{ORG_REPO}"  # placeholder: the repository to clone in Colab
    IN_COLAB = "google.colab" in sys.modules
    if IN_COLAB:
        REPO_ROOT = pathlib.Path("/content/diffusion_jax")
        if not REPO_ROOT.exists():
            subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, str(REPO_ROOT)],
                           check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO_ROOT)],
                       check=True)
    else:
        here = pathlib.Path.cwd().resolve()
        REPO_ROOT = next(
            (p for p in (here, *here.parents) if (p / "configs" / "default.py").is_file()), None
        )
        if REPO_ROOT is None:
            raise RuntimeError(f"{{here}} is not inside a diffusion_jax checkout (no configs/)")
    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(REPO_ROOT))  # `configs` is a package at the repository root
    """
)

PARAMETERS_DOC = md(
    """
    **Parameters.** `SMOKE_TEST` (set by the test suite through `DIFFUSION_JAX_SMOKE_TEST=1`)
    shrinks every run so that the whole notebook executes in a minute or two on a CPU; its
    figures are then only a check that the code runs, not results. Runs are written under
    `WORKDIR`; a finished digits run found there is reused instead of trained again (the three
    notebooks share it when they run in the same machine).
    """
)

IMPORTS = code(
    """
    import jax
    import jax.numpy as jnp
    import matplotlib
    import numpy as np

    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")  # headless (a script or a terminal): draw into files, never a window
    import matplotlib.pyplot as plt

    # JAX uses a GPU or TPU runtime when there is one (Colab: Runtime > Change runtime type).
    print("JAX", jax.__version__, "devices:", jax.devices())
    """
)

DIGITS_RUN = code(
    '''
    from configs import digits
    from diffusion_jax import models
    from diffusion_jax.runs import build, generate, restore, train


    def digits_config():
        """configs/digits.py with DIGITS_STEPS training steps (smaller U-Net if SMOKE_TEST)."""
        config = digits.get_config()
        config.training.num_steps = DIGITS_STEPS
        config.training.log_every = max(DIGITS_STEPS // 10, 1)
        config.training.checkpoint_every = DIGITS_STEPS
        if SMOKE_TEST:  # fewer layers compile faster on a CPU; data, process and loss are unchanged
            config.model.num_res_blocks = 1
            config.model.attn_resolutions = ()
            config.sampling.num_steps = 10
            config.sampling.num_images = config.sampling.batch_size = 16
        return config


    def train_or_restore(config, workdir):
        """(model, state): a finished run in `workdir` is restored, any other trained or resumed."""
        try:
            model, state, step = restore.restore_for_inference(config, str(workdir))
            if step >= config.training.num_steps:
                print(f"Restored the finished run in {workdir} (step {step})")
                return model, state
        except FileNotFoundError:
            pass
        state = train.train_and_evaluate(config, str(workdir))
        return models.build_model(config.model), state


    DIGITS_WORKDIR = WORKDIR / ("digits_smoke" if SMOKE_TEST else "digits")
    '''
)


# ---------------------------------------------------------------- quickstart.ipynb


def quickstart() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
            # diffusion_jax: quick start

            {badge("quickstart")}

            Train a denoising diffusion model (DDPM, Ho et al. 2020) on a 2-D swiss roll in
            about a minute, look at its samples and at the paths three samplers take from noise
            to data; then train on scikit-learn's 8x8 handwritten digits for a few minutes and
            look at a grid of samples. Everything runs through the same public functions as
            `python -m diffusion_jax.main --config configs/toy2d.py --workdir DIR`.
            """
        ),
        SETUP,
        PARAMETERS_DOC,
        code(
            """
            SMOKE_TEST = os.environ.get("DIFFUSION_JAX_SMOKE_TEST", "0") == "1"
            WORKDIR = pathlib.Path(
                os.environ.get("DIFFUSION_JAX_COLABS_WORKDIR", "/tmp/diffusion_jax_colabs")
            )
            TOY_STEPS = 200 if SMOKE_TEST else 4000  # configs/toy2d.py: 4000
            NUM_POINTS = 200 if SMOKE_TEST else 2000  # samples drawn from the toy model
            DIGITS_STEPS = 20 if SMOKE_TEST else 2000  # configs/digits.py: a few minutes on CPU
            """
        ),
        IMPORTS,
        md(
            """
            ## 1. The swiss roll

            `configs/toy2d.py`: a residual MLP learns the noise eps added to 2-D points
            (linear betas, T = 1000, L_simple). `train.train_and_evaluate` is what `main.py`
            calls: it trains, checkpoints into the work directory, and writes `samples.png`.
            """
        ),
        code(
            """
            import shutil

            from configs import toy2d

            toy_config = toy2d.get_config()
            toy_config.training.num_steps = TOY_STEPS
            toy_config.training.log_every = max(TOY_STEPS // 10, 1)
            toy_config.training.checkpoint_every = TOY_STEPS
            toy_config.sampling.num_steps = 50 if SMOKE_TEST else 1000  # the final samples.png
            toy_config.sampling.num_images = toy_config.sampling.batch_size = NUM_POINTS
            toy_workdir = WORKDIR / "toy2d"
            shutil.rmtree(toy_workdir, ignore_errors=True)  # train from scratch each time

            from diffusion_jax import models
            from diffusion_jax.runs import build, generate, restore, train

            toy_state = train.train_and_evaluate(toy_config, str(toy_workdir))
            toy_model = models.build_model(toy_config.model)
            toy_params = restore.inference_params(toy_state, toy_config)  # the EMA parameters
            """
        ),
        md(
            """
            The loss as it was logged (`metrics.jsonl` in the work directory; TensorBoard
            reads `tensorboard/`).
            """
        ),
        code(
            """
            import json

            records = [json.loads(line) for line in open(toy_workdir / "metrics.jsonl")]
            records = [r for r in records if "loss" in r]
            plt.figure(figsize=(4, 3))
            plt.plot([r["step"] for r in records], [r["loss"] for r in records], marker="o")
            plt.xlabel("step")
            plt.ylabel("L_simple")
            plt.yscale("log")
            plt.title("swiss roll training loss")
            plt.show()
            """
        ),
        md(
            """
            ## 2. Three samplers, and the paths they take

            Every sampler has one signature, `sample(model_fn, noise, rng, cond) -> (x0, info)`
            (`diffusion_jax.samplers`). We draw from the trained model with the 1000-step
            ancestral sampler of DDPM, 50 steps of DDIM (Song et al. 2021, eta = 0) and 20
            steps of DPM-Solver++(2M) (Lu et al. 2022). To see the paths we wrap the network:
            `jax.debug.callback` records every point x_t at which the sampler evaluates it.
            """
        ),
        code(
            """
            from diffusion_jax import data, samplers

            toy_process = build.make_process(toy_config.diffusion)
            apply_fn = build.network_fn(toy_model, train=False)
            toy_model_fn = lambda x, t, cond=None: apply_fn(toy_params, x, t, cond, None)

            SAMPLER_STEPS = {
                "ddpm": 100 if SMOKE_TEST else 1000,
                "ddim": 50,
                "dpm_solver++": 20,
            }


            def make_toy_sampler(name, num_steps):
                options = {"prediction": toy_config.diffusion.target, "clip_x0": False}
                return samplers.make_sampler(
                    name, schedule=toy_process, num_steps=num_steps, **options
                )


            def recording(model_fn, visited):
                \"\"\"model_fn that appends each input x_t [B, 2] to `visited`, in order.\"\"\"

                def recorded(x, t, cond=None):
                    jax.debug.callback(lambda x_t: visited.append(np.asarray(x_t)), x, ordered=True)
                    return model_fn(x, t, cond)

                return recorded


            noise = jax.random.normal(jax.random.key(0), (NUM_POINTS, 2))
            toy_samples, paths = {}, {}
            for name, num_steps in SAMPLER_STEPS.items():
                visited = []
                sample = make_toy_sampler(name, num_steps)
                x0, info = sample(recording(toy_model_fn, visited), noise, jax.random.key(1))
                jax.effects_barrier()  # every callback has run
                toy_samples[name] = np.asarray(x0)
                paths[name] = np.stack(visited + [np.asarray(x0)])  # [NFE + 1, N, 2]
                print(f"{name:13s} NFE {int(info['nfe']):4d}")
            """
        ),
        code(
            """
            # As many training points as samples, from the data pipeline training reads.
            iterator = data.make_dataset(
                toy_config.data, split="train", seed=0, global_batch_size=NUM_POINTS
            )
            reference = next(iterator)["x"]  # [N, 2]
            iterator.close()

            fig, axes = plt.subplots(2, 4, figsize=(16, 8), sharex=True, sharey=True)
            axes[0, 0].scatter(*reference.T, s=2, c="gray")
            axes[0, 0].set_title("data")
            axes[1, 0].scatter(*np.asarray(noise).T, s=2, c="gray")
            axes[1, 0].set_title("noise x_T")
            shown = slice(0, 24)  # a few paths
            for column, name in enumerate(SAMPLER_STEPS, start=1):
                axes[0, column].scatter(*toy_samples[name].T, s=2)
                axes[0, column].set_title(f"{name}, {SAMPLER_STEPS[name]} steps")
                path = paths[name][:, shown]  # [NFE + 1, 24, 2]
                axes[1, column].plot(path[..., 0], path[..., 1], lw=0.6, alpha=0.7)
                axes[1, column].scatter(*path[-1].T, s=6, c="k", zorder=3)
                axes[1, column].set_title(f"{name}: paths from x_T to x_0")
            for axis in axes.flat:
                axis.set_xlim(-3, 3)  # points a poorly trained model throws far away are cut
                axis.set_ylim(-3, 3)
                axis.set_aspect("equal")
            plt.show()
            """
        ),
        md(
            """
            DDPM's paths are noisy (each step adds fresh noise: the reverse SDE), DDIM's and
            DPM-Solver's are smooth (both integrate the probability-flow ODE) and, with the
            same x_T, end at nearly the same points, DPM-Solver++ with 20 network calls.

            ## 3. Handwritten digits

            `configs/digits.py`: a small U-Net on scikit-learn's 1,797 digits (8x8, 17 grey
            levels), 2000 steps of batch 64: about five minutes on two CPU cores, well under one
            on a GPU. A finished run in the work directory is reused.
            """
        ),
        DIGITS_RUN,
        code(
            """
            digits_cfg = digits_config()
            digits_model, digits_state = train_or_restore(digits_cfg, DIGITS_WORKDIR)
            digits_params = restore.inference_params(digits_state, digits_cfg)

            # 64 samples with the configured sampler (100 DDIM steps), as `--mode=sample` does.
            generate_digits = jax.jit(generate.make_generate_fn(digits_cfg, digits_model, count=64))
            digit_samples = np.asarray(generate_digits(digits_params, jax.random.key(2)))  # [64, 8, 8, 1]

            from diffusion_jax.runtime import images

            grid = images.image_grid(digit_samples, columns=8, scale=4)  # uint8 [H, W, C]
            plt.figure(figsize=(5, 5))
            plt.imshow(grid[..., 0], cmap="gray")
            plt.axis("off")
            plt.title(f"digits after {DIGITS_STEPS} steps ({digits_cfg.sampling.sampler}, "
                      f"{digits_cfg.sampling.num_steps} steps)")
            plt.show()
            """
        ),
        md(
            """
            Next: `samplers.ipynb` compares every sampler's quality against the number of
            network evaluations, `likelihood.ipynb` takes the bits/dim bound apart term by term.
            From the command line, the same digits run is

            ```
            python -m diffusion_jax.main --config configs/digits.py --workdir /tmp/digits
            ```
            """
        ),
    ]


# ---------------------------------------------------------------- samplers.ipynb


def samplers_notebook() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
            # Samplers: quality against the number of network evaluations

            {badge("samplers")}

            Every sampler of `diffusion_jax.samplers.SAMPLERS`, at several step counts, on
            1. an analytic 2-D Gaussian mixture whose optimal network is known in closed form
               (`diffusion_jax.diffusion.gaussian_mixture`): what remains is the sampler's own error;
            2. a trained digits model: what a user sees, the sampler's error on top of the
               network's.

            The x axis is the measured NFE (`info["nfe"]`); Heun-type and predictor-corrector
            samplers use about two network calls per step, the adaptive `ode` sampler is swept
            over its tolerance instead of its step count.
            """
        ),
        SETUP,
        PARAMETERS_DOC,
        code(
            """
            SMOKE_TEST = os.environ.get("DIFFUSION_JAX_SMOKE_TEST", "0") == "1"
            WORKDIR = pathlib.Path(
                os.environ.get("DIFFUSION_JAX_COLABS_WORKDIR", "/tmp/diffusion_jax_colabs")
            )
            STEP_COUNTS = (8,) if SMOKE_TEST else (5, 10, 20, 50, 100)
            ODE_TOLERANCES = (1e-2,) if SMOKE_TEST else (1e-1, 1e-2, 1e-3, 1e-4)
            MIXTURE_SAMPLES = 2000 if SMOKE_TEST else 20000  # the exact model is cheap
            DIGITS_STEPS = 20 if SMOKE_TEST else 2000  # configs/digits.py; the quick start's run
            DIGITS_SAMPLES = 128 if SMOKE_TEST else 1000
            DIGITS_STEP_COUNTS = (4,) if SMOKE_TEST else (5, 10, 20, 50)
            """
        ),
        IMPORTS,
        md(
            """
            ## The samplers and their settings

            Each sampler is read with the options the network needs (prediction type, no
            clipping for the mixture, whose support is unbounded). `steps_settings` lists the
            settings of a sweep: a step count for every sampler but `ode`, whose adaptive
            step count follows its tolerance.
            """
        ),
        code(
            """
            from diffusion_jax import samplers
            from diffusion_jax.diffusion import gaussian_mixture, noise_schedule
            from diffusion_jax.diffusion import process as process_lib

            print("samplers:", list(samplers.SAMPLERS))


            def steps_settings(name, step_counts):
                \"\"\"[(num_steps, options)] of a sweep of sampler `name`.\"\"\"
                if name == "ode":
                    return [(1, {"rtol": tol, "atol": tol}) for tol in ODE_TOLERANCES]
                return [(n, {}) for n in step_counts]


            def sweep(name, schedule, model_fn, noise, quality_fn, *, step_counts, **options):
                \"\"\"[(nfe, quality)] of sampler `name` over its settings.\"\"\"
                allowed = samplers.sampler_options(name)
                options = {key: value for key, value in options.items() if key in allowed}
                points = []
                for num_steps, extra in steps_settings(name, step_counts):
                    sample = samplers.make_sampler(name, schedule=schedule, num_steps=num_steps,
                                                   **options, **extra)
                    x0, info = jax.jit(sample, static_argnums=0)(model_fn, noise, jax.random.key(1))
                    points.append((int(info["nfe"]), quality_fn(np.asarray(x0))))
                return points


            def plot_sweeps(results, *, ylabel, floor=None, title=""):
                plt.figure(figsize=(8, 5))
                for index, (name, points) in enumerate(results.items()):
                    nfe, quality = zip(*points)
                    style = "--" if name.startswith(("ddpm", "euler_maruyama", "pc")) else "-"
                    plt.plot(nfe, quality, style, marker="o", color=plt.cm.tab20(index), label=name)
                if floor is not None:
                    plt.axhline(floor, color="gray", ls=":", label="sampling noise floor")
                plt.xscale("log")
                plt.yscale("log")
                plt.xlabel("NFE (network evaluations)")
                plt.ylabel(ylabel)
                plt.title(title)
                plt.legend(fontsize=8, ncol=2)
                plt.show()
            """
        ),
        md(
            """
            ## 1. The analytic Gaussian mixture (exact model)

            Three 2-D Gaussians (`gaussian_mixture.example_mixture()`); for any (alpha_t, sigma_t)
            the noised density is again a mixture, so the optimal eps-prediction is a closed
            form. The discrete-time samplers see the linear-beta DDPM process (T = 1000); the
            flow samplers the rectified-flow schedule x_t = (1 - t) x_0 + t eps with the exact
            velocity (they run on any schedule, but this is the one they are made for).

            Quality: the sliced 2-Wasserstein distance between the samples and as many fresh
            draws from the mixture (128 random directions; in 1-D, W2 between empirical
            distributions of equal size pairs the sorted values). Its floor, the distance
            between two independent draws of the mixture, is the dotted line.
            """
        ),
        code(
            """
            MIXTURE = gaussian_mixture.example_mixture()
            PROCESS = process_lib.make_process("linear", 1000)
            DISCRETE = noise_schedule.DiscreteSchedule(PROCESS)  # the process in continuous time
            FLOW = noise_schedule.FlowSchedule()


            # GaussianMixture.sample passes the shape where jax.random.categorical expects the axis.
            def draw_mixture(rng, num_samples):
                \"\"\"Draws [N, D] of MIXTURE: component k ~ weights, then N(mu_k, diag(v_k)).\"\"\"
                component_key, normal_key = jax.random.split(rng)
                log_weights = jnp.log(MIXTURE.weights)
                components = jax.random.categorical(component_key, log_weights, shape=[num_samples])
                normal = jax.random.normal(normal_key, (num_samples, MIXTURE.means.shape[1]))
                return MIXTURE.means[components] + jnp.sqrt(MIXTURE.variances[components]) * normal


            def exact_model(schedule, prediction):
                \"\"\"The optimal network of the mixture, at the network time of `schedule`.\"\"\"
                alpha_sigma_fn = lambda t: schedule.alpha_sigma(schedule.t_from_model_time(t))
                return gaussian_mixture.exact_model_fn(MIXTURE, alpha_sigma_fn, prediction)


            def sliced_wasserstein(x, y, *, num_directions=128, seed=0):
                \"\"\"Sliced W2 between point clouds x, y [N, D] of equal size.\"\"\"
                angles = np.random.default_rng(seed).normal(size=(x.shape[1], num_directions))
                directions = angles / np.linalg.norm(angles, axis=0)  # [D, P]
                x_proj, y_proj = np.sort(x @ directions, axis=0), np.sort(y @ directions, axis=0)
                return float(np.sqrt(np.mean((x_proj - y_proj) ** 2)))


            reference = np.asarray(draw_mixture(jax.random.key(10), MIXTURE_SAMPLES))
            second_draw = np.asarray(draw_mixture(jax.random.key(11), MIXTURE_SAMPLES))
            floor = sliced_wasserstein(second_draw, reference)
            quality = lambda x: sliced_wasserstein(x, reference)
            mixture_noise = jax.random.normal(jax.random.key(0), (MIXTURE_SAMPLES, 2))

            mixture_results = {}
            for name in samplers.SAMPLERS:
                flow = name.startswith("flow")
                schedule, prediction = (FLOW, "velocity") if flow else (PROCESS, "eps")
                model_fn = exact_model(FLOW if flow else DISCRETE, prediction)
                mixture_results[name] = sweep(
                    name, schedule, model_fn, mixture_noise, quality,
                    step_counts=STEP_COUNTS, prediction=prediction, clip_x0=False,
                )
                points = mixture_results[name]
                print(f"{name:15s}", ", ".join(f"NFE {n}: {q:.3f}" for n, q in points))
            plot_sweeps(mixture_results, ylabel="sliced W2 to the mixture", floor=floor,
                        title="exact model of a Gaussian mixture")
            """
        ),
        md(
            """
            Dashed lines are stochastic samplers (DDPM, Euler-Maruyama, predictor-corrector):
            they need many steps, as the noise they inject is only right in the small-step
            limit. The high-order ODE solvers (DPM-Solver, DPM-Solver++, EDM Heun, the
            adaptive `ode`) reach the floor with the fewest evaluations. For pathwise errors
            against a float64 reference solution see `docs/samplers.md`.

            ## 2. A trained digits model

            The digits run of the quick start (trained here unless the work directory holds
            a finished one). Quality: the Fréchet distance between the samples and the
            training images in the features of the project's digits classifier (`fd_digits`,
            the FID recipe with a small MLP in place of Inception, trained in a few seconds).
            The classifier sees 8x8 images, so the numbers are not comparable with any FID.
            """
        ),
        DIGITS_RUN,
        code(
            """
            from diffusion_jax.evaluation import features, metrics

            digits_cfg = digits_config()
            digits_model, digits_state = train_or_restore(digits_cfg, DIGITS_WORKDIR)
            digits_params = restore.inference_params(digits_state, digits_cfg)
            digits_process, digits_prediction = generate.sampling_schedule(digits_cfg.diffusion)
            apply_fn = build.network_fn(digits_model, train=False)
            digits_model_fn = lambda x, t, cond=None: apply_fn(digits_params, x, t, cond, None)

            extractor = features.digits_extractor(cache_path=str(WORKDIR / "digits_classifier.npz"))
            train_images, _ = features.digits_split("train")
            train_features = extractor(train_images)


            def fd_digits(images):
                \"\"\"Fréchet distance of images [N, 8, 8, 1] to the training images.\"\"\"
                sample_features = extractor(images)
                return metrics.frechet_distance(
                    sample_features.mean(0), np.cov(sample_features, rowvar=False),
                    train_features.mean(0), np.cov(train_features, rowvar=False),
                )


            shape = (DIGITS_SAMPLES, *models.sample_shape(digits_cfg.model))
            digits_noise = jax.random.normal(jax.random.key(0), shape)
            digits_results = {}
            for name in samplers.SAMPLERS:
                digits_results[name] = sweep(
                    name, digits_process, digits_model_fn, digits_noise, fd_digits,
                    step_counts=DIGITS_STEP_COUNTS, prediction=digits_prediction,
                    variance_type=digits_cfg.diffusion.variance_type,
                    clip_x0=digits_cfg.sampling.clip_x0,
                )
                points = digits_results[name]
                print(f"{name:15s}", ", ".join(f"NFE {n}: {q:.2f}" for n, q in points))
            plot_sweeps(digits_results, ylabel="fd_digits (Fréchet distance, classifier features)",
                        title=f"digits model after {DIGITS_STEPS} training steps")
            """
        ),
        md(
            """
            The flow samplers integrate the same probability-flow ODE as DDIM, in the
            schedule's own time t with steps uniform in t (their default spacing), which on a
            VP schedule crowds the steps where little happens: they are shown to make the
            point, they are meant for flow-matching models (`diffusion.loss_type="flow_matching"`).
            """
        ),
    ]


# ---------------------------------------------------------------- likelihood.ipynb


def likelihood_notebook() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
            # Likelihood: the bits/dim bound term by term, and the ODE likelihood

            {badge("likelihood")}

            Two ways to score data under a diffusion model, two different numbers:
            - the **variational bound** of the discrete chain (Ho et al. 2020, Eq. 5),
              L = L_T + sum_t L_t + L_0, an upper bound on -log p(x_0)
              (`diffusion_jax.diffusion.likelihood.bits_per_dim`; DDPM and Improved DDPM report it);
            - the **probability-flow ODE likelihood** (Song et al. 2021, Sec. 4.3): the ODE maps
              data to noise deterministically and the change of variables gives log p exactly,
              up to the solver and Hutchinson's trace estimate
              (`diffusion_jax.evaluation.ode_likelihood`; score_sde reports it).

            First on a Gaussian mixture, where the true log-density is known; then on digits.
            """
        ),
        SETUP,
        PARAMETERS_DOC,
        code(
            """
            SMOKE_TEST = os.environ.get("DIFFUSION_JAX_SMOKE_TEST", "0") == "1"
            WORKDIR = pathlib.Path(
                os.environ.get("DIFFUSION_JAX_COLABS_WORKDIR", "/tmp/diffusion_jax_colabs")
            )
            MIXTURE_POINTS = 64 if SMOKE_TEST else 1000
            DIGITS_STEPS = 20 if SMOKE_TEST else 2000  # configs/digits.py; the quick start's run
            DIGITS_IMAGES = 8 if SMOKE_TEST else 64  # test images scored
            ODE_TOLERANCE = 1e-3 if SMOKE_TEST else 1e-5  # rtol = atol of the likelihood ODE
            """
        ),
        IMPORTS,
        md(
            """
            ## 1. A Gaussian mixture, where log p is known

            The exact eps-network of `gaussian_mixture.example_mixture()` under the linear-beta
            process (T = 1000). The data are continuous, so the bound uses the Gaussian decoder
            (a density at t = 0, not the 8-bit bins of images) and the ODE needs no
            dequantization. Both are in bits per dimension: -log2 p(x) / D with D = 2.
            """
        ),
        code(
            """
            from diffusion_jax.diffusion import gaussian_mixture, likelihood, noise_schedule
            from diffusion_jax.diffusion import process as process_lib
            from diffusion_jax.evaluation import ode_likelihood

            MIXTURE = gaussian_mixture.example_mixture()
            PROCESS = process_lib.make_process("linear", 1000)
            DISCRETE = noise_schedule.DiscreteSchedule(PROCESS)
            alpha_sigma_fn = lambda t: DISCRETE.alpha_sigma(DISCRETE.t_from_model_time(t))
            exact_eps = gaussian_mixture.exact_model_fn(MIXTURE, alpha_sigma_fn, "eps")


            # GaussianMixture.sample passes the shape where jax.random.categorical expects the axis.
            def draw_mixture(rng, num_samples):
                \"\"\"Draws [N, D] of MIXTURE: component k ~ weights, then N(mu_k, diag(v_k)).\"\"\"
                component_key, normal_key = jax.random.split(rng)
                log_weights = jnp.log(MIXTURE.weights)
                components = jax.random.categorical(component_key, log_weights, shape=[num_samples])
                normal = jax.random.normal(normal_key, (num_samples, MIXTURE.means.shape[1]))
                return MIXTURE.means[components] + jnp.sqrt(MIXTURE.variances[components]) * normal


            x0 = draw_mixture(jax.random.key(0), MIXTURE_POINTS)  # [N, 2]
            bound = jax.jit(
                lambda x, rng: likelihood.bits_per_dim(
                    PROCESS, exact_eps, x, rng, decoder="gaussian"
                )
            )(x0, jax.random.key(1))
            true_bits = -MIXTURE.log_prob(x0) / (2 * np.log(2.0))  # [N]
            print(f"true -log2 p(x) / D : {float(true_bits.mean()):.4f} bits/dim")
            print(f"variational bound   : {float(bound['total'].mean()):.4f} bits/dim "
                  f"(prior L_T {float(bound['prior'].mean()):.2e})")
            """
        ),
        md(
            """
            **The bound term by term.** L_t (t >= 1) is the KL divergence between the true
            posterior q(x_{t-1} | x_t, x_0) and the model's step, L_0 the decoder's
            -log p(x_0 | x_1). With the optimal network the KL terms do not vanish: the
            model's reverse step is Gaussian with a fixed variance, the true posterior given
            only x_t is not. Most of the bound sits at small t.
            """
        ),
        code(
            """
            terms = np.asarray(bound["terms"]).mean(0)  # [T]: mean L_t over the points
            steps = np.arange(len(terms))
            fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
            left.plot(steps[1:], terms[1:])
            left.set_yscale("log")
            left.set_xlabel("t")
            left.set_ylabel("L_t (bits/dim)")
            left.set_title(f"mixture, exact model: L_t against t (L_0 = {terms[0]:.3f})")
            right.plot(steps, np.cumsum(terms), label="L_0 + ... + L_t")
            right.axhline(float(true_bits.mean()), color="k", ls=":", label="true -log2 p(x) / D")
            right.set_xscale("symlog", linthresh=10)
            right.set_xlim(0, len(terms))
            right.set_xlabel("t")
            right.set_ylabel("bits/dim")
            right.set_title("cumulative bound")
            right.legend()
            plt.show()
            """
        ),
        md(
            """
            **The ODE likelihood** of the same points, with the exact divergence (D = 2 is
            cheap). It gives log p at t_min = 1/T, where the data carry noise of standard
            deviation sigma_{t_min} = 0.01; the mixture's density at that noise level is
            `MIXTURE.log_prob(x, alpha, sigma)`, so each point can be checked.
            """
        ),
        code(
            """
            ode_bits_fn = ode_likelihood.make_ode_bits_per_dim_fn(
                PROCESS, num_bins=None, divergence="exact", rtol=ODE_TOLERANCE, atol=ODE_TOLERANCE
            )
            ode = jax.jit(ode_bits_fn, static_argnums=0)(exact_eps, x0, jax.random.key(2))
            alpha_min, sigma_min = DISCRETE.alpha_sigma(jnp.float32(DISCRETE.t_min))
            true_bits_t_min = -MIXTURE.log_prob(x0, alpha_min, sigma_min) / (2 * np.log(2.0))
            print(f"ODE likelihood      : {float(ode['bits_per_dim'].mean()):.4f} bits/dim, "
                  f"NFE {int(ode['nfe'])}")
            print(f"true at t_min       : {float(true_bits_t_min.mean()):.4f} bits/dim")
            print(f"largest per-point difference: "
                  f"{float(jnp.max(jnp.abs(ode['bits_per_dim'] - true_bits_t_min))):.2e} bits/dim")

            plt.figure(figsize=(4, 4))
            plt.scatter(true_bits_t_min, ode["bits_per_dim"], s=4)
            line = [float(true_bits_t_min.min()), float(true_bits_t_min.max())]
            plt.plot(line, line, "k:", lw=1)
            plt.xlabel("exact -log2 p_{t_min}(x) / D")
            plt.ylabel("ODE likelihood (bits/dim)")
            plt.title("per point")
            plt.show()
            """
        ),
        md(
            """
            ## 2. Digits

            The digits run of the quick start (trained here unless the work directory holds a
            finished one), scored on test images. The bound uses the config's decoder
            (`eval.decoder="discretized"`: the 8-bit bins of Ho et al., Eq. 13); the ODE
            likelihood dequantizes uniformly on `eval.num_bins = 256` levels, so that both
            bound -log2 P(x) / D of the same 8-bit data: this is what
            `python -m diffusion_jax.main --mode=eval` reports with
            `--config.eval.likelihoods='("vlb", "ode")'`.
            """
        ),
        DIGITS_RUN,
        code(
            """
            from diffusion_jax.runs import likelihood as likelihood_run

            digits_cfg = digits_config()
            digits_model, digits_state = train_or_restore(digits_cfg, DIGITS_WORKDIR)
            digits_params = restore.inference_params(digits_state, digits_cfg)

            digits_cfg.eval.batch_size, digits_cfg.eval.num_batches = DIGITS_IMAGES, 1
            digits_cfg.eval.ode_rtol = digits_cfg.eval.ode_atol = ODE_TOLERANCE
            batch = next(likelihood_run.eval_batches(digits_cfg))  # {"x": [B, 8, 8, 1], ...}

            process = build.make_process(digits_cfg.diffusion)
            apply_fn = build.network_fn(digits_model, train=False)
            digits_bound = jax.jit(
                lambda params, x, rng: likelihood.bits_per_dim(
                    process, lambda x_t, t: apply_fn(params, x_t, t, None, None), x, rng,
                    prediction=digits_cfg.diffusion.target,
                    variance_type=digits_cfg.diffusion.variance_type,
                    decoder=digits_cfg.eval.decoder,
                )
            )(digits_params, batch["x"], jax.random.key(3))
            ode_fn = jax.jit(likelihood_run.make_ode_bits_per_dim_fn(digits_cfg, digits_model))
            digits_ode = ode_fn(digits_params, batch, jax.random.key(4))
            print(f"variational bound: {float(digits_bound['total'].mean()):.3f} bits/dim")
            print(f"ODE likelihood   : {float(digits_ode['bits_per_dim'].mean()):.3f} bits/dim "
                  f"(NFE {int(digits_ode['nfe'])}, Hutchinson {digits_cfg.eval.ode_divergence})")
            """
        ),
        code(
            """
            digits_terms = np.asarray(digits_bound["terms"]).mean(0)  # [T]
            plt.figure(figsize=(6, 4))
            plt.plot(np.arange(1, len(digits_terms)), digits_terms[1:], label="L_t, t >= 1")
            plt.axhline(digits_terms[0], color="C1", ls="--",
                        label=f"L_0 (decoder) = {digits_terms[0]:.3f}")
            plt.yscale("log")
            plt.xlabel("t")
            plt.ylabel("bits/dim")
            total = float(digits_bound["total"].mean())
            plt.title(f"digits: L_t against t (total {total:.3f} bits/dim)")
            plt.legend()
            plt.show()
            """
        ),
        md(
            """
            The bound and the ODE likelihood are different quantities (a bound of the
            discrete chain; a density of the dequantized data through a deterministic map);
            report which one. On CIFAR-10, DDPM's weights give 3.70-3.75 bits/dim by the bound
            and 3.28 through the ODE (score_sde, Song et al. 2021).
            """
        ),
    ]


NOTEBOOKS = {
    "quickstart": quickstart,
    "samplers": samplers_notebook,
    "likelihood": likelihood_notebook,
}


def build_notebook(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(cells=NOTEBOOKS[name]())
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    notebook.metadata["accelerator"] = "GPU"  # Colab offers a GPU runtime when opened
    notebook.metadata["colab"] = {"provenance": [], "name": f"{name}.ipynb"}
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{name}-{index:02d}"  # stable ids: rebuilding changes nothing
    nbformat.validate(notebook)
    return notebook


def main() -> None:
    for name in NOTEBOOKS:
        path = COLABS_DIR / f"{name}.ipynb"
        nbformat.write(build_notebook(name), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
