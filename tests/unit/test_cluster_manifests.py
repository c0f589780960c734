"""cluster/: the Ray cluster-launcher config, the KubeRay RayJob and the job-submission example.

Nothing here talks to a cloud or to Kubernetes. The checks cover structure: the YAML parses,
the launcher config passes Ray's own `ray up` validation, the RayJob has what KubeRay needs,
and every fmlray command in these files is a valid fmlray config that fits the cluster
the file describes.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from fmlray.config import load_config
from fmlray.engine.resources import Capacity, plan_actors

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "gpu-cluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
PVC = CLUSTER / "results-pvc.yaml"
READER = CLUSTER / "results-reader.yaml"
SUBMIT = CLUSTER / "submit-example.sh"


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name} must hold one YAML mapping"
    return doc


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load(LAUNCHER)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load(RAYJOB)


def fmlray_command(argv: list[str]) -> tuple[Path, list[str]]:
    """`python -m fmlray run --config F --set k=v ...` → (F relative to the repo, [k=v, ...])."""
    assert argv[:4] == ["python", "-m", "fmlray", "run"], f"not an fmlray run command: {argv}"
    config, overrides, rest = None, [], argv[4:]
    i = 0
    while i < len(rest):
        flag = rest[i]
        if flag.startswith("$"):  # "$@" in the shell script: extra args from its caller
            i += 1
            continue
        assert flag in ("--config", "-c", "--set", "-s"), f"unexpected argument {flag!r} in {argv}"
        assert i + 1 < len(rest), f"{flag} without a value in {argv}"
        if flag in ("--config", "-c"):
            config = rest[i + 1]
        else:
            overrides.append(rest[i + 1])
        i += 2
    assert config is not None, f"give --config explicitly: {argv}"
    return Path(config), overrides


def checked_config(argv: list[str]):
    """Load the command's config like `fmlray run` would, from the repository root (the job's working_dir)."""
    config, overrides = fmlray_command(argv)
    assert not config.is_absolute(), "the --config path is relative to the job's working_dir (the repo root)"
    assert (REPO / config).is_file(), f"--config {config} does not exist in the repository"
    cfg = load_config(REPO / config, overrides)
    assert cfg.engine.kind == "ray"
    assert "engine.kind=ray" in overrides
    assert Path(cfg.run.output_dir).is_absolute(), \
        "run.output_dir must be absolute: a relative one lands in the job's temporary working_dir"
    return cfg


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_dependencies() -> list[str]:
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


# ---------------------------------------------------------------------------------------------
# All manifests


@pytest.mark.parametrize("path", [LAUNCHER, RAYJOB, PVC, READER], ids=lambda p: p.name)
def test_yaml_files_parse(path):
    load(path)


def test_readme_covers_every_file_and_the_lifecycle():
    text = (CLUSTER / "README.md").read_text()
    for name in ("gpu-cluster.yaml", "rayjob.yaml", "results-pvc.yaml", "results-reader.yaml", "submit-example.sh"):
        assert name in text
    for command in ("ray up", "ray job submit", "ray job logs", "ray rsync-down", "ray down",
                    "helm install", "kubectl apply -f cluster/rayjob.yaml", "kubectl get rayjob",
                    "kubectl logs", "kubectl cp", "kubectl delete", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                    "ray job stop", "RAY_JOB_STOP_WAIT_TIME_S", "python -m fmlray run --resume /mnt/fmlray/runs/"):
        assert command in text, command


def test_the_readmes_local_head_is_stopped_alone_and_every_job_command_has_the_token_mode():
    """`ray stop` ends every Ray on the machine (other users' and test sessions' too): a snippet that
    starts a local head must stop that head only, with RAY_AUTH_MODE=token for its `ray job` commands."""
    text = (CLUSTER.parent / "README.md").read_text()
    commands = [line.strip() for line in text.splitlines()]
    assert not [c for c in commands if c.startswith("ray stop")]
    assert "ray start --head --block" in text and "kill $HEAD" in text
    first = lambda prefix: min(i for i, c in enumerate(commands) if c.startswith(prefix))  # noqa: E731
    assert first("export RAY_AUTH_MODE=token") < first("ray start --head") < first("ray job")
    assert "ray job stop" in text and "python -m fmlray run --resume" in text


def test_ray_versions_agree(launcher, rayjob):
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    images = [launcher["docker"]["image"]] + [
        c["image"]
        for spec in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]] + rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for c in spec["template"]["spec"]["containers"]
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{version}-"), f"{image} does not run Ray {version}"


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (`ray up`)


def test_launcher_has_what_ray_up_needs(launcher):
    assert launcher["cluster_name"]
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    assert launcher["auth"]["ssh_user"]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    for name, node_type in types.items():
        assert "resources" in node_type and "node_config" in node_type, name
        assert node_type["node_config"].get("InstanceType"), name
    assert "ray start --head" in " ".join(launcher["head_start_ray_commands"])
    assert "--port=6379" in " ".join(launcher["head_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(launcher["worker_start_ray_commands"])


def test_launcher_head_is_cpu_only_and_a_worker_type_has_gpus(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert "CPU" in head["resources"] and head["resources"].get("GPU", 0) == 0
    gpu_workers = {name: t for name, t in types.items()
                   if name != launcher["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker node type advertises GPUs"
    for name, t in gpu_workers.items():
        # fmlray plans its actors from the nodes present at start, so some must be there
        assert 1 <= t["min_workers"] <= t["max_workers"] <= launcher["max_workers"], name
        assert t["resources"]["CPU"] >= 1, name


def test_launcher_syncs_the_checkout_and_installs_fmlray(launcher):
    mounts = launcher["file_mounts"]
    assert mounts, "file_mounts must sync the checkout"
    remote, local = next(iter(mounts.items()))
    assert not Path(local).is_absolute(), "the local side is relative to the repo root, where `ray up` runs"
    assert (REPO / local / "pyproject.toml").is_file(), f"{local} (from the repo root) is not the checkout"
    setup = " ".join(launcher["setup_commands"])
    assert re.search(r"pip install[^;&|]*torch", setup) and "torchvision" in setup
    assert re.search(rf"pip install[^;&|]*-e\s+{re.escape(remote)}", setup), \
        f"setup_commands must pip install the synced checkout {remote}"
    assert ".gitignore" in launcher.get("rsync_filter", []), "copy what git tracks (not .venv, runs/, data/)"


def test_launcher_puts_run_folders_on_storage_every_node_shares(launcher):
    # the run folder was ~/fmlray-runs on each node's own disk: the actors on the workers could not write
    # their checkpoint rows into the head's run folder, and fmlray refuses that at start (audit 23)
    assert "-v /efs:/efs" in launcher["docker"]["run_options"]
    assert re.search(r"mount -t nfs4 .*:/ /efs", " ".join(launcher["initialization_commands"]))
    readme = (CLUSTER / "README.md").read_text()
    dirs = re.findall(r"--set run\.output_dir=(\S+)", readme.split("## Ray cluster launcher on AWS")[1].split("## ")[0])
    assert dirs and all(d.startswith("/efs/") for d in dirs), dirs
    assert "ray rsync-down cluster/gpu-cluster.yaml /efs/fmlray-runs/ ./runs/" in readme


def test_launcher_passes_rays_own_schema(launcher):
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    jsonschema = pytest.importorskip("jsonschema")
    import json
    schema_path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"this Ray ships no {schema_path.name}")
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))


def test_launcher_passes_ray_up_validation(launcher):
    """What `ray up` does before it calls AWS: fill in the provider defaults, then validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(launcher))
    util.validate_config(prepared)
    assert prepared["head_node_type"] == launcher["head_node_type"]


# ---------------------------------------------------------------------------------------------
# KubeRay RayJob


def test_rayjob_kind_and_lifecycle(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def test_rayjob_entrypoint_is_a_valid_fmlray_ray_run(rayjob):
    cfg = checked_config(shlex.split(rayjob["spec"]["entrypoint"]))
    # the pod has no Fashion-MNIST: it downloads, onto the persistent volume
    assert cfg.data.dataset == "fmnist" and cfg.data.download is True
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [Path(m["mountPath"]) for c in head["containers"] for m in c.get("volumeMounts", [])]
    for path in (cfg.run.output_dir, cfg.data.root):
        assert any(Path(path).is_relative_to(m) for m in mounts), \
            f"{path} is not on a volume mounted in the head pod (where the driver runs)"
    assert all(g.num_gpus > 0 for g in cfg.clients.groups), "client actors should use the GPU workers"


def test_rayjob_runtime_env_ships_code_and_dependencies(rayjob):
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    url = urlparse(env["working_dir"])
    assert url.scheme == "https" and url.path.endswith(".zip")
    wanted = {requirement_name(d) for d in pyproject_dependencies()} - {"ray"}
    assert {requirement_name(p) for p in env["pip"]} == wanted, "runtime_env pip must match pyproject (minus ray)"
    runtime_env = pytest.importorskip("ray.runtime_env")
    runtime_env.RuntimeEnv(**env)  # Ray's own validation of the fields


def test_rayjob_cluster_spec(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["rayStartParams"].get("num-cpus") == "0", "keep client actors off the head"
    assert head["template"]["spec"]["containers"][0]["image"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayjob_run_fits_its_cluster(rayjob):
    """The actors fmlray would plan for the entrypoint fit the GPU workers the RayJob creates."""
    cfg = load_config(*fmlray_command(shlex.split(rayjob["spec"]["entrypoint"])))
    cpus = gpus = node_cpus = node_gpus = 0.0
    for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        c, n = _cpu(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0))
        cpus, gpus = cpus + g["minReplicas"] * c, gpus + g["minReplicas"] * n
        node_cpus, node_gpus = max(node_cpus, c), max(node_gpus, n)
    specs = plan_actors(cfg, Capacity(cpus=cpus, gpus=gpus, node_cpus=node_cpus, node_gpus=node_gpus))
    assert specs and sum(s.num_gpus for s in specs) <= gpus + 1e-9
    assert sum(len(s.client_ids) for s in specs) == cfg.clients.num_clients


def _mounts_of(pod: dict, claim: str) -> set[str]:
    """Where a pod's containers mount the PVC `claim`."""
    volumes = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    return {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in volumes}


def test_results_volume_is_the_one_the_rayjob_and_reader_mount(rayjob):
    claim = load(PVC)
    assert claim["kind"] == "PersistentVolumeClaim"
    name = claim["metadata"]["name"]
    # every Ray pod mounts it where the run folder is: the client actors (on the workers) write their
    # checkpoint rows into the run's folder, and fmlray refuses at start a folder an actor cannot write
    # (audit 23: only the head mounted it, a ReadWriteOnce volume)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    output_dir = Path(checked_config(shlex.split(rayjob["spec"]["entrypoint"])).run.output_dir)
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        mounts = _mounts_of(pod, name)
        assert any(output_dir.is_relative_to(m) for m in mounts), (pod["containers"][0]["name"], mounts)
        assert pod.get("securityContext", {}).get("fsGroup") == 100, "the ray user (gid 100) must write the volume"
    reader = load(READER)
    assert reader["kind"] == "Pod"
    assert name in [v.get("persistentVolumeClaim", {}).get("claimName") for v in reader["spec"]["volumes"]]


# ---------------------------------------------------------------------------------------------
# submit-example.sh


def shell_commands(path: Path) -> list[str]:
    """The script's commands, with backslash-continued lines joined and comments dropped."""
    commands, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
        else:
            commands.append(current + stripped)
            current = ""
    return commands


def test_submit_example_is_valid_bash_and_executable():
    assert SUBMIT.stat().st_mode & 0o111, "chmod +x cluster/submit-example.sh"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(SUBMIT)], check=True)


def test_submit_example_submits_a_valid_fmlray_ray_run():
    submits = [c for c in shell_commands(SUBMIT) if c.startswith("ray job submit")]
    assert len(submits) == 1
    argv = shlex.split(submits[0])
    assert "--address" in argv and "--working-dir" in argv
    cfg = checked_config(argv[argv.index("--") + 1:])
    assert cfg.data.dataset == "digits"


def test_submit_example_follows_the_logs_and_handles_token_auth():
    commands = shell_commands(SUBMIT)
    assert any(c.startswith("ray job logs") and ("--follow" in c or " -f" in c) for c in commands)
    text = SUBMIT.read_text()
    assert "RAY_AUTH_MODE" in text and "RAY_AUTH_TOKEN" in text
