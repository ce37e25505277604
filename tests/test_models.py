"""The models, their config and the training loop: every architecture of the search space builds and runs, bad
configs fail naming the key, training stays finite at the extremes and stops clearly when it cannot."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from aae_ray.config import AAEConfig, ConfigError, load_config
from aae_ray.training_loop import TrainingDiverged, build_model, fit_model, mix_defects

# --- every architecture of the source research's space builds and runs ----------------------------------------


@pytest.mark.parametrize("latent_dim", [2, 12, 32])
@pytest.mark.parametrize("conv_blocks", [2, 3, 4, 5])
@pytest.mark.parametrize("input_size", [32, 64, 128])
@pytest.mark.parametrize("family", ["aae", "ae"])
def test_architecture_builds_and_runs_a_forward_pass(family, input_size, conv_blocks, latent_dim):
    """Every (input_size, conv_blocks) pair is valid: the deepest, 32 px with 5 blocks, still leaves 1 px."""
    cfg = AAEConfig(family=family, input_size=input_size, conv_blocks=conv_blocks, latent_dim=latent_dim,
                    base_channels=8, fc_units=16, disc_units=16)
    model = build_model(cfg).eval()
    assert sum(isinstance(m, nn.Conv2d) for m in model.encoder.modules()) == conv_blocks
    x = torch.rand(2, 1, input_size, input_size)
    with torch.no_grad():
        z, x_hat = model(x)
    assert z.shape == (2, latent_dim)
    assert x_hat.shape == (2, 1, input_size, input_size)
    assert ((x_hat >= 0) & (x_hat <= 1)).all()  # sigmoid output, like the [0, 1] input
    if family == "aae":
        with torch.no_grad():
            assert model.discriminator(z).shape == (2,)
    else:
        assert not hasattr(model, "discriminator")


@pytest.mark.parametrize("family", ["aae", "ae"])
def test_reconstruction_loss_trains_on_a_batch_of_two(family):
    """Training mode with the smallest batch BatchNorm allows, at the deepest 32 px net (1x1 features)."""
    cfg = AAEConfig(family=family, conv_blocks=5, latent_dim=12, base_channels=8, fc_units=16)
    model = build_model(cfg).train()
    loss, codes, logs = model.reconstruction_loss(torch.rand(2, 1, 32, 32), torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    if family == "aae":  # the global codes and the local code map (the default local_depth of 1)
        codes, local = codes
        assert local.shape == (2, cfg.local_dim, 16, 16) and not local.requires_grad
    assert codes.shape == (2, 12) and not codes.requires_grad
    assert set(logs) == {"rec", "push"}  # the default defect_loss: its term is logged, 0 in a batch of normals


def test_family_picks_the_model_class():
    assert build_model(AAEConfig(family="aae", base_channels=8)).adversarial
    assert not build_model(AAEConfig(family="ae", base_channels=8)).adversarial


@pytest.mark.parametrize(("key", "value"), [("conv_blocks", 1), ("conv_blocks", 6), ("input_size", 48),
                                            ("latent_dim", 1), ("family", "vit"), ("anomaly_ratio", 0.5)])
def test_config_rejects_values_outside_the_search_space(key, value):
    with pytest.raises(ValidationError, match=key):
        AAEConfig(**{key: value})


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        AAEConfig().lr = 0.1


# --- config errors name the key and raise ConfigError -------------------------------------------------------


def test_override_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"^config: conv_blocks: .*less than or equal to 5"):
        load_config(overrides=["conv_blocks=9"])


def test_unknown_override_names_the_key_and_lists_known_ones():
    with pytest.raises(ConfigError, match=r"nope: Extra inputs are not permitted \(known keys: .*latent_dim"):
        load_config(overrides=["nope=1"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="--set expects key=value, got 'lr'"):
        load_config(overrides=["lr"])


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(overrides=["lr=0.005", "family=ae", "latent_dim=12", "threshold=f_ucl"])
    assert (cfg.lr, cfg.family, cfg.latent_dim, cfg.threshold) == (0.005, "ae", 12, "f_ucl")


def test_precedence_is_defaults_then_file_then_fields_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("latent_dim: 20\nepochs: 7\nlr: 0.002\n")
    cfg = load_config(path, ["lr=0.003"], epochs=3)
    assert (cfg.latent_dim, cfg.epochs, cfg.lr, cfg.conv_blocks) == (20, 3, 0.003, 3)


def test_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("conv_blocks: 9\n")
    with pytest.raises(ConfigError, match=rf"^{path}: conv_blocks: "):
        load_config(path)


def test_broken_yaml_file_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: 0.001\nlatent_dim: [12, 16\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML at line \d+"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a mapping of key: value"):
        load_config(path)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == AAEConfig()


def test_config_error_is_a_value_error():
    """The CLI turns ValueErrors into one-line messages; a ConfigError must be one."""
    assert issubclass(ConfigError, ValueError)


# --- training stays finite at the extremes, and stops clearly when it cannot ---------------------------------


@pytest.mark.parametrize(
    "extreme",
    [
        pytest.param({"lr": 1e-2, "lr_adv": 1e-2, "adv_weight": 100.0, "disc_steps": 5}, id="fast-adversarial"),
        pytest.param({"lr": 1e-2, "lr_adv": 1e-2, "defect_loss": "push", "push_weight": 100.0}, id="hard-push"),
        pytest.param({"family": "ae", "lr": 1e-1, "weight_decay": 1e-1}, id="ae-max-lr"),
    ],
)
def test_training_at_extreme_settings_stays_finite(extreme):
    cfg = AAEConfig(base_channels=8, fc_units=32, disc_units=32, latent_dim=12, batch_size=16, epochs=3,
                    **extreme)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 32, 32, generator=gen)
    defect = torch.zeros(64, dtype=torch.bool)
    defect[::8] = True  # a few confirmed defects, for the push term
    torch.manual_seed(0)
    model = build_model(cfg)
    history = fit_model(model, x, defect, cfg)
    assert len(history) == 3
    assert all(math.isfinite(v) for h in history for v in h.losses.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_images_raise_training_diverged_naming_where_and_what_to_change():
    cfg = AAEConfig(base_channels=8, fc_units=32, latent_dim=4, batch_size=16, epochs=2, lr=3e-3)
    x = torch.full((32, 1, 32, 32), float("nan"))
    model = build_model(cfg)
    expected = r"^training diverged at epoch 1, step 0: \{'rec': nan.*lower lr \(now 0.003\) or lr_adv \(now 0.001\)"
    with pytest.raises(TrainingDiverged, match=expected):
        fit_model(model, x, torch.zeros(32, dtype=torch.bool), cfg)


def test_training_diverged_is_a_runtime_error():
    """So the CLI reports it as one line instead of a traceback."""
    assert issubclass(TrainingDiverged, RuntimeError)


def test_aae_step_logs_every_loss_by_name():
    cfg = AAEConfig(base_channels=8, fc_units=32, latent_dim=4, defect_loss="push")
    model = build_model(cfg)
    logs = model.train_step(torch.rand(8, 1, 32, 32), torch.tensor([True, False] * 4), model.configure_optimizers())
    assert set(logs) == {"rec", "push", "disc", "gen"}


def _gaussian_kl(z: np.ndarray) -> float:
    """KL(N(mean, cov) || N(0, I)) of the codes' first two moments: 0 exactly when they match the prior."""
    mu, cov = z.mean(0), np.cov(z.T)
    return 0.5 * float(np.trace(cov) + mu @ mu - len(mu) - np.linalg.slogdet(cov)[1])


def test_adversarial_steps_pull_codes_to_the_standard_normal_prior():
    """Steps 2 and 3 alone (discriminator on detached codes, then the encoder against it), with the model's own
    losses and optimizers, on noise images (so the encoder can spread its codes freely), without the latent
    BatchNorm (which would fix the first two moments by construction). Measured over 10 seeds
    after 300 steps: KL to N(0, I) 0.02-0.12 (19-23 untrained), mean norm <= 0.46, variances 0.69-1.21.
    A sign flip in either loss, or a generator step that does not reach the encoder, leaves it far off."""
    cfg = AAEConfig(base_channels=8, fc_units=32, latent_dim=4, latent_norm=False, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = model.configure_optimizers()
    x = torch.rand(256, 1, 32, 32, generator=torch.Generator().manual_seed(0))

    def codes() -> np.ndarray:
        model.eval()
        with torch.no_grad():
            z = model.encoder(x).numpy()
        model.train()
        return z

    def step(name: str, loss: torch.Tensor) -> None:
        opt[name].zero_grad()
        loss.backward()
        opt[name].step()

    before = _gaussian_kl(codes())
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        xb = x[torch.randint(len(x), (64,), generator=gen)]
        with torch.no_grad():
            z = model.encoder(xb)
        for _ in range(cfg.disc_steps):
            step("disc", model.discriminator_loss(z))
        step("gen", model.generator_loss(xb))
    after = codes()
    assert before > 10
    assert _gaussian_kl(after) < 0.5
    assert np.linalg.norm(after.mean(0)) < 0.6
    assert ((after.var(0) > 0.5) & (after.var(0) < 2.0)).all()


def test_a_small_adv_weight_trains_closer_to_none_than_to_full_weight():
    """adv_weight scales the adversarial term. At 0.01 the codes should lie nearer to adv_weight=0's than to
    adv_weight=1's. Measured: |z(0.01) - z(1)| max 0.003, |z(0) - z(1)| max 0.07 -- the weight does nothing."""
    x = torch.rand(128, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    codes = {}
    for w in (0.0, 0.01, 1.0):
        cfg = AAEConfig(base_channels=8, fc_units=32, latent_dim=4, latent_norm=False, batch_size=64, epochs=2,
                        adv_weight=w)
        torch.manual_seed(0)
        model = build_model(cfg)
        fit_model(model, x, torch.zeros(len(x), dtype=torch.bool), cfg)
        with torch.no_grad():
            codes[w] = model.encoder(x).numpy()
    to_none = np.abs(codes[0.01] - codes[0.0]).max()
    to_full = np.abs(codes[0.01] - codes[1.0]).max()
    assert to_none < to_full


def test_a_batch_of_only_defects_under_push_stays_finite():
    """It happens in real runs: 306 normals + 16 mixed defects at batch 64 leave a last batch of 2, which is all
    defects now and then (seed 7 of the push measurement in test_detector diverged at epoch 8, step 5)."""
    cfg = AAEConfig(base_channels=8, fc_units=32, latent_dim=4, defect_loss="push")
    model = build_model(cfg)
    logs = model.train_step(torch.rand(2, 1, 32, 32), torch.ones(2, dtype=torch.bool), model.configure_optimizers())
    assert all(math.isfinite(v) for v in logs.values())


# --- mixing confirmed defects into training ---------------------------------------------------------------------


def test_mix_defects_repeats_few_defects_to_reach_the_ratio():
    """0.5% of the training set: 5 / (1000 + 5) ~ 0.005, drawn from 3 defects, so some repeat."""
    idx = mix_defects(1000, 3, 0.005, np.random.default_rng(0))
    assert len(idx) == 5
    assert set(idx.tolist()) <= {0, 1, 2}


def test_mix_defects_takes_a_subset_without_repeats_when_there_are_enough():
    idx = mix_defects(1000, 40, 0.02, np.random.default_rng(0))
    assert len(idx) == 20 == len(set(idx.tolist()))
    assert set(idx.tolist()) <= set(range(40))


@pytest.mark.parametrize(("n_defect", "ratio"), [(3, 0.0), (0, 0.005)])
def test_mix_defects_is_empty_without_ratio_or_defects(n_defect, ratio):
    idx = mix_defects(1000, n_defect, ratio, np.random.default_rng(0))
    assert len(idx) == 0 and idx.dtype == np.int64
