"""Multi-process training and moving checkpoints between meshes, on CPU devices.

- 2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train MQAR for 20 steps and end
  with the parameters of 1 process x 8 devices.
- A checkpoint written from 8 devices in a (2, 2, 2) mesh restores onto 4 devices in (4, 1, 1) and onto 1
  device with identical parameters, and training continues from it.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ramjax.errors import ConfigError
from ramjax.train import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]

TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from ramjax.train import distributed
    layout = distributed.initialize(*(sys.argv[2:3] or [None]), *(int(x) for x in sys.argv[3:5]))
    import jax
    from tiny import tiny_config
    from ramjax.train.trainer import train

    config = tiny_config("ramnet", steps=20)
    config.data.eval_settings = "2:32,4:32"
    config.model.ramnet.impl = "dense"
    config.train.checkpoint_every = 10
    config.train.log_every = 5
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    summary = train(config, sys.argv[1])
    print("LAYOUT", layout, jax.process_count(), jax.device_count(), flush=True)
""")

# Restores the newest checkpoint of each workdir onto this process's devices and mesh, prints the params.
RESTORE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from tiny import tiny_config
    from ramjax.train.setup import restore_state
    from ramjax.train.trainer import train

    mesh = tuple(int(x) for x in sys.argv[1].split(","))
    out = {}
    for workdir in sys.argv[2:]:
        config = tiny_config("ramnet", steps=20)
        config.data.eval_settings = "2:32,4:32"
        config.model.ramnet.impl = "dense"
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
        state, meta = restore_state(config, workdir)
        devices = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state["params"])})
        out[workdir] = dict(step=meta["step"], devices=devices,
                            params=[np.asarray(x).tolist() for x in jax.tree.leaves(state["params"])])
    if len(sys.argv) == 3 and jax.device_count() < 8:
        # Training goes on from the moved checkpoint, on this mesh.
        config.train.num_steps = 24
        config.train.checkpoint_every = 4
        summary = train(config, sys.argv[2], amend=True)  # more steps: a deliberate, recorded change
        out["continued"] = dict(resumed_from=summary["resumed_from"], steps=summary["steps"])
    print("RESULTS" + json.dumps(out))
""")


def cpu_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    for name in distributed.ENV:
        env.pop(name, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_restore(mesh: str, devices: int, *workdirs) -> dict:
    result = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, mesh, *workdirs], cwd=ROOT, env=cpu_env(devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))[7:])


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    """1 process x 8 devices, mesh (2, 2, 2), 20 steps."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    result = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, workdir], cwd=ROOT, env=cpu_env(8),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LAYOUT single process 1 8" in result.stdout
    return workdir


@pytest.mark.slow  # about a minute on 2 cores
def test_two_processes_of_four_devices_equal_one_process_of_eight(eight_device_run, tmp_path):
    workdir = str(tmp_path / "two_processes")
    address = f"localhost:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, workdir, address, "2", str(i)], cwd=ROOT,
                                  env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "LAYOUT 2 processes (flags) 2 8" in out
    # Only process 0 writes the logs and the summary.
    assert "finished 20 steps" in outputs[0][0] and "finished 20 steps" not in outputs[1][0]
    with open(os.path.join(workdir, "summary.json")) as f:
        two = json.load(f)
    with open(os.path.join(eight_device_run, "summary.json")) as f:
        one = json.load(f)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-5)
    restored = run_restore("2,2,2", 8, eight_device_run, workdir)
    a, b = restored[eight_device_run], restored[workdir]
    assert a["step"] == b["step"] == 20
    for x, y in zip(a["params"], b["params"], strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert np.sqrt(np.mean((x - y) ** 2) / max(np.mean(x**2), 1e-30)) < 1e-5


# slow: ~35 s on 2 cores for the (4, 1, 1) case, with the 8-device run it restores. A run resumes on its own mesh
# in tests/test_train.py's fast tests, and an 8-device step equals a 1-device one in its fast mesh test.
@pytest.mark.slow
@pytest.mark.parametrize("mesh,devices", [("4,1,1", 4), ("1,1,1", 1)])
def test_checkpoint_from_eight_devices_restores_on_another_mesh(eight_device_run, tmp_path, mesh, devices):
    import shutil

    original = run_restore("2,2,2", 8, eight_device_run)[eight_device_run]
    assert original["devices"] == [8] and original["step"] == 20
    moved = str(tmp_path / "moved")
    shutil.copytree(eight_device_run, moved)
    os.remove(os.path.join(moved, "summary.json"))
    results = run_restore(mesh, devices, moved)
    restored = results[moved]
    assert restored["devices"] == [devices] and restored["step"] == 20
    for x, y in zip(original["params"], restored["params"], strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
    assert results["continued"] == {"resumed_from": 20, "steps": 24}


def test_distributed_initialize_needs_the_whole_layout(monkeypatch):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.initialize() == "single process"
    with pytest.raises(ConfigError, match="give all of the coordinator address"):
        distributed.initialize("localhost:1234", None, None)
    with pytest.raises(ConfigError, match="process id must be in"):
        distributed.initialize("localhost:1234", 2, 5)
    monkeypatch.setenv("RAMJAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("RAMJAX_PROCESS_ID", "0")
    monkeypatch.setenv("RAMJAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert distributed.initialize() == "single process"


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from tiny import MQAR
    from ramjax.train.setup import step_memory

    out = {}
    for mesh in ("8,1,1", "1,8,1"):
        config = MQAR.get_config("ramnet,cpu")
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(x) for x in mesh.split(","))
        out[mesh] = step_memory(config)
    print("RESULTS" + json.dumps(out))
""")


# slow: ~16 s on 2 cores; which parameter dimensions fsdp shards is tests/test_sharding.py's fast check.
@pytest.mark.slow
def test_fsdp_divides_parameter_and_optimizer_memory_per_device():
    """From the compiled step's memory analysis: arguments (parameters, Adam moments, batch) fall ~8x from a
    (8, 1, 1) to a (1, 8, 1) mesh, and the activations stay batch-sharded (temporaries do not grow)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], cwd=ROOT, env=cpu_env(8), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    memory = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))[7:])
    data, fsdp = memory["8,1,1"], memory["1,8,1"]
    assert data["state_bytes_per_device"] / fsdp["state_bytes_per_device"] > 7
    assert data["argument_bytes"] / fsdp["argument_bytes"] > 6
    assert fsdp["temp_bytes"] < 1.25 * data["temp_bytes"]


KERNEL_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from tiny import tiny_config
    from ramjax.train.setup import restore_state
    from ramjax.train.trainer import train

    out = {}
    for name, mesh, devices in (("one", (1, 1, 1), jax.devices()[:1]), ("eight", (2, 2, 2), None)):
        config = tiny_config("ramnet", steps=2)
        config.data.eval_settings = "2:32,4:32"
        config.model.ramnet.impl = "pallas"  # interpret mode on the CPU
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
        summary = train(config, tempfile.mkdtemp(), devices=devices)
        state, _ = restore_state(config, summary["workdir"], devices=devices)
        out[name] = [np.asarray(x).tolist() for x in jax.tree.leaves(state["params"])]
    # The kernel call sits inside a shard_map in the sharded step.
    import jax.numpy as jnp
    from flax import nnx
    from ramjax.models import LanguageModel
    from ramjax.train import sharding
    model = LanguageModel(config.model, rngs=nnx.Rngs(0))
    model.shard_activations(sharding.make_mesh(config.mesh), ("data", "fsdp"), "tensor")
    graphdef, variables = nnx.split(model)
    tokens = jnp.zeros((8, 32), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda v, t: nnx.merge(graphdef, v)(t))(variables, tokens)
    out["jaxpr_has_shard_map"] = "shard_map" in str(jaxpr)
    print("RESULTS" + json.dumps(out))
""")


# slow: ~35 s on 2 cores (two trainings); an 8-device training step equals a 1-device one (RAM-Net with its
# XLA memory, and a transformer) in tests/test_train.py's fast mesh test.
@pytest.mark.slow
def test_pallas_kernel_runs_per_shard_and_matches_one_device():
    result = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], cwd=ROOT, env=cpu_env(8), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))[7:])
    assert out["jaxpr_has_shard_map"]
    for x, y in zip(out["one"], out["eight"], strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert np.sqrt(np.mean((x - y) ** 2) / max(np.mean(x**2), 1e-30)) < 1e-5


LINEAR_KERNEL_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from ramjax import ops

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    per_head = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, k, v = normal(4, 37, 2, 5), normal(4, 37, 2, 5), normal(4, 37, 2, 7)
    k_unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    decay = -jnp.asarray(rng.uniform(0, 0.5, size=(4, 37, 2, 5)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, size=(4, 37, 2)), jnp.float32)
    from ramjax.ops.loglinear import num_levels
    weights = jnp.asarray(rng.uniform(0.2, 2.0, size=(4, 37, 2, num_levels(37) + 1)), jnp.float32)
    # (op, inputs, whether it returns a final state): the log-linear ops' kernels run without one (training).
    cases = {"gla": (ops.gated_linear_attention, (q, k, v, decay), True),
             # one q and k head for both heads (Mamba-2's B and C): whole on every head shard
             "gla_shared_qk": (ops.gated_linear_attention, (q[:, :, :1], k[:, :, :1], v, decay[..., 0]), True),
             "delta": (ops.gated_delta_rule, (q, k_unit, v, decay[..., 0], beta), True),
             "loglinear_mamba2": (ops.loglinear_attention,
                                  (q[:, :, :1], k[:, :, :1], v, decay[..., 0], weights), False),
             "loglinear_delta": (ops.loglinear_gated_delta, (q, k_unit, v, decay[..., 0], beta, weights), False)}
    out = {}
    for name, (op, inputs, with_state) in cases.items():
        def loss(*args, sharding):
            if not with_state:
                o = op(*args, impl="pallas", chunk_size=16, sharding=sharding)
                return jnp.sum(o ** 2), o
            o, final = op(*args, impl="pallas", chunk_size=16, return_final_state=True, sharding=sharding)
            return jnp.sum(o ** 2) + jnp.sum(final), o
        grad = lambda sharding: jax.jit(jax.grad(lambda *a: loss(*a, sharding=sharding), argnums=tuple(
            range(len(inputs))), has_aux=True))
        want_grads, want_o = grad(None)(*inputs)
        got_grads, got_o = grad(per_head)(*inputs)
        text = str(jax.make_jaxpr(lambda *a: loss(*a, sharding=per_head))(*inputs))
        err = lambda x, y: float(jnp.sqrt(jnp.mean((x - y) ** 2) / jnp.mean(y ** 2)))
        out[name] = {"o": err(got_o, want_o), "grads": [err(g, w) for g, w in zip(got_grads, want_grads)],
                     "shard_map": "shard_map" in text}
    # In the model: the trainer's shard_activations reaches every mixer with a kernel.
    import sys
    sys.path.insert(0, "tests")
    from flax import nnx
    from tiny import tiny_config
    from ramjax.models import LanguageModel
    models = {}
    for pattern in ("gla", "mamba2", "gated_deltanet", "loglinear_mamba2", "loglinear_gated_deltanet"):
        config = tiny_config(pattern)
        config.model.gla.chunk_size = config.model.mamba2.chunk_size = config.model.gated_deltanet.chunk_size = 16
        config.model.gla.impl = config.model.mamba2.impl = config.model.gated_deltanet.impl = "pallas"
        config.model.loglinear.impl = "pallas"
        model = LanguageModel(config.model, rngs=nnx.Rngs(0))
        model.shard_activations(mesh, ("data", "fsdp"), "tensor")
        graphdef, variables = nnx.split(model)
        text = str(jax.make_jaxpr(lambda v, t: nnx.merge(graphdef, v)(t))(variables, jnp.zeros((8, 32), jnp.int32)))
        models[pattern] = "shard_map" in text
    print("RESULTS" + json.dumps({"ops": out, "models": models}))
""")


@pytest.mark.slow  # ~15 s on 2 cores; the kernels themselves are checked unsharded in their own test files
def test_linear_attention_kernels_run_per_shard_and_match_one_device():
    """GLA (also with one q and k head shared by the heads), the delta rule and both log-linear ops with
    impl="pallas" (interpret mode here) on a (2, 2, 2) mesh: each device's batch rows and heads under shard_map,
    outputs and gradients equal to the unsharded call."""
    result = subprocess.run([sys.executable, "-c", LINEAR_KERNEL_SCRIPT], cwd=ROOT, env=cpu_env(8),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))[7:])
    for name, case in out["ops"].items():
        assert case["shard_map"], name
        assert case["o"] < 1e-6 and max(case["grads"]) < 1e-6, (name, case)
    assert all(out["models"].values()), out["models"]  # each mixer's kernel under shard_map in the model


PREEMPT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from ramjax.train import distributed
    distributed.initialize(sys.argv[2], 2, int(sys.argv[3]))
    from tiny import tiny_config
    from ramjax.train.trainer import train

    config = tiny_config("ramnet", steps=100000)
    config.model.ramnet.impl = "dense"
    config.train.checkpoint_every = 50000
    config.train.log_every, config.train.eval_every = 20, 50000
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 1
    train(config, sys.argv[1])
""")


@pytest.mark.slow  # two processes plus their compiles: ~40 s on 2 cores, and timing-sensitive on a loaded machine
def test_processes_signalled_at_different_steps_stop_together(tmp_path):
    """SIGTERM to process 0, and 1.5 s (many steps) later to process 1, as a scheduler does: both stop at the
    same step, save it together and exit 0 (before, each stopped at its own step and both hung)."""
    import signal
    import time

    workdir = str(tmp_path / "run")
    address = f"localhost:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", PREEMPT_SCRIPT, workdir, address, str(i)], cwd=ROOT,
                                  env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    try:
        deadline = time.time() + 300  # until both train: process 0 logs metrics from step 20
        while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        processes[0].send_signal(signal.SIGTERM)
        time.sleep(1.5)
        processes[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=180) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    saved = []
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        line = next(line for line in out.splitlines() if "SIGTERM received" in line)
        saved.append(int(line.split("saved step ")[1].split()[0]))
    assert saved[0] == saved[1] > 0
    assert "by another process" not in outputs[0][0]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved[0])))
