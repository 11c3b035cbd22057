"""Ahead-of-time compiles (fcnjax.train.precompile), compile accounting (fcnjax.compilation)
and the bucket cost profile of a training run (data.cost_profile / --cost-profile)."""

import json
import re
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from fcnjax import compilation, configs
from fcnjax.experiments import voc_fcn8s
from fcnjax.train import precompile as precompile_lib
from fcnjax.train.loop import train
from train_helpers import write_tiny_voc


class _Stop:
  requested = False


def test_precompiler_runs_every_job_and_a_waited_job_jumps_the_queue():
  release = threading.Event()
  ran = []

  def slow():
    release.wait(30)
    ran.append("slow")
    return "slow"

  def job(name):
    def run():
      ran.append(name)
      return name
    return run

  lines = []
  pc = precompile_lib.Precompiler({"slow": slow, "a": job("a"), "b": job("b")}, threads=1,
                                  print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))),
                                  progress=False)
  assert pc.threads == 1 and lines[0].startswith("compile: 3 programs on 1 thread")
  pc.wait("b")  # queued behind "slow", which blocks the only thread: compiled right here
  assert ran == ["b"] and pc.waited_s >= 0
  release.set()
  pc.wait("slow")
  pc.wait("a")
  pc.wait("never submitted")  # a no-op
  assert sorted(ran) == ["a", "b", "slow"]
  deadline = time.time() + 10
  while not lines[-1].startswith("compile: 3 programs ready") and time.time() < deadline:
    time.sleep(0.05)
  assert lines[-1].startswith("compile: 3 programs ready in ") and "failed" not in lines[-1]
  pc.close()


def test_precompiler_reraises_a_failed_compile_and_a_stop_ends_a_wait():
  block, started = threading.Event(), threading.Event()

  def bad():
    raise ValueError("no such shape")

  def blocked():
    started.set()
    block.wait(30)

  pc = precompile_lib.Precompiler({"bad": bad, "blocked": blocked}, threads=2,
                                  print_fn=lambda *a, **k: None, progress=False)
  with pytest.raises(ValueError, match="no such shape"):
    pc.wait("bad")
  assert started.wait(10)  # running on its thread (not queued: wait() would run it here)
  stop = _Stop()
  stop.requested = True
  t0 = time.perf_counter()
  pc.wait("blocked", stop, poll_s=0.05)  # returns although the compile is still running
  assert time.perf_counter() - t0 < 5
  block.set()
  pc.close()


def test_compile_stats_tell_cold_compiles_from_cache_loads(tmp_path):
  # the test session's cache folder ($JAX_COMPILATION_CACHE_DIR, see conftest) wins over ours
  folder = compilation.enable_persistent_cache(str(tmp_path))
  assert folder and compilation.cache_dir() == folder
  offset = float(time.time_ns() % 1_000_003)  # a program no earlier run has cached

  def program():
    return jax.jit(lambda x: jnp.tanh(x) @ x.T + offset)

  x = jnp.ones((40, 40))
  stats = compilation.CompileStats()
  program()(x).block_until_ready()
  cold = stats.counts()
  assert cold.by_name.get("jit(<lambda>)") == 1 and cold.cold >= 1 and cold.cold_s > 0
  jax.clear_caches()
  stats.mark()
  program()(x).block_until_ready()
  warm = stats.counts()
  assert warm.by_name.get("jit(<lambda>)") == 1 and warm.warm >= 1 and warm.cold == 0
  assert "from the cache (warm)" in warm.describe() and "compiled (cold)" not in warm.describe()


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
  return write_tiny_voc(tmp_path_factory.mktemp("voc"))


def _tiny(voc_root, **train_fields):
  """voc_fcn8s smoke at 1/16 width, 2 buckets, 4 steps, one final evaluation."""
  cfg = configs.load("voc_fcn8s:smoke")
  cfg.data.root = str(voc_root)
  cfg.model.width_multiplier = 1 / 16
  cfg.optim.update(optimizer="sgd", learning_rate=0.01, warmup_steps=0)
  cfg.train.update(steps=4, log_every=1, **train_fields)
  cfg.data.update(batch_size=4, max_buckets="2")
  cfg.checkpoint.save_every = 4
  cfg.eval.every_epochs = 1000
  cfg.output.compile_cache = ""
  return cfg


def _compile_record(workdir):
  recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in recs if r["kind"] == "compile"], recs


@pytest.mark.slow
def test_a_run_compiles_each_bucket_once_ahead_of_time_and_trains_the_same(voc_root, tmp_path,
                                                                           capsys):
  on = train(_tiny(voc_root, compile_threads=1), tmp_path / "on")  # ahead even on 2 cores
  out = capsys.readouterr().out
  (rec,), recs = _compile_record(tmp_path / "on")
  train_report = out.split("train buckets: ")[1].split(" batches over ")[0]
  train_buckets = re.findall(r"^ +\d+ x \d+ +batch", train_report, re.M)
  assert "compile: " in out and " programs (" in out and "in the background" in out
  assert "compile (whole run): " in out and "steps waited" in out
  # one train-step program per bucket, compiled once (ahead of time; the loop reused it)
  assert rec["by_name"]["jit(train_step)"] == len(train_buckets) == 2
  assert rec["by_name"]["jit(eval_step)"] >= 1 and rec["step"] == 4
  # the session-wide test cache may already hold some programs: each is cold or warm
  assert rec["waited_s"] >= 0 and rec["cold"] + rec["warm"] == rec["programs"]
  off = train(_tiny(voc_root, precompile=False), tmp_path / "off")
  (rec_off,), recs_off = _compile_record(tmp_path / "off")
  assert rec_off["by_name"]["jit(train_step)"] == 2  # the same programs, at first use
  assert rec_off["by_name"]["jit(eval_step)"] == rec["by_name"]["jit(eval_step)"]
  losses = lambda rs: [r["loss"] for r in rs if r["kind"] == "train"]  # noqa: E731
  assert losses(recs) == losses(recs_off)  # bit for bit: the same programs
  assert on["mean_iu"] == off["mean_iu"]


def test_config_rejects_bad_precompile_settings():
  for field, value, text in (("train.compile_threads", -1, "integer >= 0"),
                             ("train.precompile", "yes", "true or false"),
                             ("data.cost_profile", 3, "path of a cost profile")):
    cfg = configs.load("voc_fcn8s:smoke")
    section, name = field.split(".")
    with cfg[section].ignore_type():
      setattr(cfg[section], name, value)
    with pytest.raises(configs.ConfigError, match=text):
      configs.validate(cfg)


def test_a_bad_cost_profile_is_one_line_naming_the_flag(tmp_path, capsys):
  for content, text in ((None, "no such cost profile file"), ("{", "not JSON"),
                        ('{"version": 1}', "missing field")):
    path = tmp_path / "profile.json"
    if content is not None:
      path.write_text(content)
    rc = voc_fcn8s.main(["--max-buckets", "auto", "--cost-profile", str(path), "--workdir",
                         str(tmp_path / "w"), "--compile-cache", ""])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --cost-profile {path}: {text}"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_auto_buckets_use_the_cost_profile_and_say_why(voc_root, tmp_path, capsys):
  from fcnjax.data import bucket_costs
  cheap = bucket_costs.CostProfile(  # compiles free: auto takes as many buckets as help
      compile_s_per_bucket=1e-6, warm_compile_s_per_bucket=1e-6, s_per_pixel=1e-3,
      backend=jax.default_backend(), model="fcn8s", width_multiplier=1 / 16, aligned=True,
      precision="fp32")
  dear = bucket_costs.CostProfile(  # compiles dear: one bucket
      compile_s_per_bucket=1e6, warm_compile_s_per_bucket=1e6, s_per_pixel=1e-12,
      backend="gpu", model="fcn8s", width_multiplier=1.0, aligned=False, precision="bf16")
  ks = {}
  for name, profile in (("cheap", cheap), ("dear", dear)):
    path = bucket_costs.save_profile(profile, tmp_path / f"{name}.json")
    cfg = _tiny(voc_root)
    cfg.train.steps = 1
    cfg.data.max_buckets = "auto"
    cfg.data.cost_profile = str(path)
    train(cfg, tmp_path / name)
    out = capsys.readouterr().out
    assert f"buckets auto: cost profile {path}" in out
    ks[name] = int(out.split("train buckets: ")[1].split(" bucket")[0])
    assert ("warning: backend: measured on gpu" in out) == (name == "dear")
  assert ks["dear"] == 1 and ks["cheap"] > 1, ks
