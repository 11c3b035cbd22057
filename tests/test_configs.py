"""Experiments as configs: loading, presets, overrides and their errors, resume comparison."""

import pathlib

import pytest

from fcnjax import configs
from fcnjax.configs import base
from fcnjax.train import main as runner


def test_builtin_experiments_are_listed_with_descriptions():
  exps = configs.experiments()
  assert {"voc_fcn8s", "folder", "pets"} <= set(exps)
  assert all(desc and "\n" not in desc for desc in exps.values())


@pytest.mark.parametrize("spec", ["voc_fcn8s", "voc_fcn8s:smoke", "voc_fcn8s:fast",
                                  "voc_fcn8s:paper", "folder", "folder:smoke", "folder:full",
                                  "pets", "pets:smoke", "pets:full"])
def test_every_builtin_config_and_preset_loads_and_validates(spec):
  cfg = configs.load(spec)
  configs.check_fields(cfg)
  configs.validate(cfg)
  assert cfg.name == spec.split(":")[0]


def test_presets_edit_the_base():
  smoke, fast, paper = (configs.load(f"voc_fcn8s:{p}") for p in ("smoke", "fast", "paper"))
  assert smoke.model.width_multiplier == 1 / 8 and smoke.model.aligned
  assert fast.model.width_multiplier == 1.0 and not fast.model.aligned
  assert fast.model.precision == "bf16" and fast.augment.scale_range == (0.5, 2.0)
  assert paper.optim.optimizer == "reference" and paper.optim.learning_rate is None
  assert paper.loss.reduction == "sum" and paper.train.steps == 100_000
  assert configs.load("voc_fcn8s").preset == "smoke"


def test_unknown_preset_and_experiment_name_the_choices():
  with pytest.raises(configs.ConfigError, match="presets: smoke, fast, paper"):
    configs.load("voc_fcn8s:bogus")
  with pytest.raises(configs.ConfigError, match="did you mean voc_fcn8s"):
    configs.load("voc_fcn9s")


def test_overrides_are_typed():
  cfg = runner.apply_overrides(configs.load("voc_fcn8s:smoke"), [
      "--config.optim.learning_rate=0.5", "--config.augment.scale_range=(0.5, 1.5)",
      "--config.train.steps=7", "--config.model.aligned=false", "--config.data.max_buckets=auto",
      "--config.data.builtin.num_train=10", "--config.data.classes=a,b"])
  assert cfg.optim.learning_rate == 0.5 and cfg.augment.scale_range == (0.5, 1.5)
  assert cfg.train.steps == 7 and cfg.model.aligned is False
  assert cfg.data.max_buckets == "auto" and cfg.data.builtin.num_train == 10
  assert cfg.data.classes == "a,b"


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lerning_rate=0.1", "did you mean optim.learning_rate"),
    ("--config.optimizer.learning_rate=0.1", "did you mean optim.learning_rate"),
    ("--config.train.steps=x", "invalid literal for int"),
    ("--config.optim.learning_rate=abc", "could not convert string to float"),
    ("--config.train.epochs=1.5", "train.epochs"),
    ("--lr=0.1", "unknown argument --lr"),
    ("stray", "unexpected argument 'stray'"),
])
def test_bad_overrides_are_one_clear_error(override, message):
  with pytest.raises(configs.ConfigError, match=message):
    runner.apply_overrides(configs.load("voc_fcn8s:smoke"), [override])


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "fcn9s", "not a model"),
    ("model.precision", "fp16", "must be one of fp32, bf16"),
    ("data.max_buckets", "0", r"positive integer \(1, 2, ...\) or 'auto'"),
    ("data.batch_size", 0, "must be a positive integer"),
    ("train.epochs", -1, "must be a positive integer"),
    ("optim.learning_rate", -1.0, "must be a positive number"),
    ("model.width_multiplier", 0.0, "must be >= 1/64"),
    ("augment.scale_range", (2.0, 1.0), "0 < lo <= hi"),
    ("data.val_fraction", 1.0, r"in \(0, 1\)"),
])
def test_values_out_of_range_name_the_field(field, value, message):
  cfg = configs.load("voc_fcn8s:smoke")
  section, name = field.split(".")
  setattr(cfg[section], name, value)
  with pytest.raises(configs.ConfigError, match=message):
    configs.validate(cfg)


def test_a_users_config_file_runs_through_the_same_loader(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text(
      "from fcnjax.configs import folder\n"
      "def get_config(preset=None):\n"
      "  c = folder.get_config(preset)\n"
      "  c.data.mask_values = 'binary'\n"
      "  c.train.epochs = 3\n"
      "  return c\n")
  cfg = configs.load(f"{path}:smoke")
  assert cfg.data.mask_values == "binary" and cfg.preset == "smoke"
  # A misspelt field in the user's file is caught too.
  bad = tmp_path / "bad_config.py"
  bad.write_text("from fcnjax.configs import base\n"
                 "def get_config():\n"
                 "  c = base.base_config()\n"
                 "  c.optim.lerning_rate = 0.1\n"
                 "  return c\n")
  with pytest.raises(configs.ConfigError, match="optim.lerning_rate.*did you mean"):
    configs.load(str(bad))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(configs.ConfigError, match="broken.py: cannot run the config file"):
    configs.load(str(broken))


def test_stored_config_round_trips_and_differences_are_named():
  cfg = configs.load("pets:smoke")
  again = configs.from_dict(configs.to_dict(cfg))
  assert configs.differences(cfg, again) == []
  assert again.augment.scale_range == cfg.augment.scale_range  # tuples come back as tuples
  again.optim.learning_rate = 1.0
  again.data.num_workers = 3                      # free to change on resume
  assert configs.differences(cfg, again) == [("optim.learning_rate", 3e-3, 1.0)]


def test_runner_list_and_errors(capsys):
  assert runner.main(["--list"]) == 0
  out = capsys.readouterr().out
  assert "voc_fcn8s" in out and "folder" in out and "pets" in out and "presets:" in out
  assert runner.main(["--config", "voc_fcn8s:smoke", "--config.optim.lerning_rate=1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "optim.learning_rate" in err and "Traceback" not in err
  assert runner.main([]) == 2
  assert "--config" in capsys.readouterr().err
  assert runner.main(["--config", "voc_fcn8s", "--print-config",
                      "--config.train.epochs=9"]) == 0
  assert "epochs: 9" in capsys.readouterr().out
