"""The cluster configs users start from (``cluster_configs/``) are valid and install the user's own build.

Launcher YAMLs go through Ray's own validator — what ``ray up`` runs before it touches a machine:
``prepare_config`` (merge the provider's defaults, node types), then ``validate_config`` (the
``ray-schema.json`` schema plus cross-field checks); for the local provider the whole of ``ray up``'s
config bootstrap, which is offline for it. The KubeRay manifest has no validator in the ray package,
so ``kuberay_problems`` checks what a meshload cluster needs (GPU worker groups, one image whose Ray
matches ``rayVersion`` and this Ray, the install before ``ray start``). Each check is also shown
rejecting a deliberately broken copy. Every config installs the wheel ``make wheel`` builds from the
checkout (shipped by the config: launcher ``file_mounts``, a KubeRay ConfigMap), never ``meshload`` by
name from a package index, where that name is not ours. No network, no Ray cluster.
"""

from __future__ import annotations

import copy
import os
import re

import jsonschema
import pytest
import ray
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "cluster_configs")
LAUNCHER_CONFIGS = ("onprem-local.yaml", "aws-gpu.yaml")
KUBERAY = "kuberay-raycluster.yaml"
RUNTIME_ENV = "runtime_env.yaml"


def _torch_pin() -> str:
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        match = re.search(r'"(torch==[^"]+)"', f.read())
    assert match, "pyproject.toml pins no torch version"
    return match.group(1)


def _version() -> str:
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


TORCH_PIN = _torch_pin()
RAY_PIN = f"ray[default]=={ray.__version__}"
WHEEL = f"meshload-{_version()}-py3-none-any.whl"


def by_name_installs(text: str) -> list[str]:
    """``pip install`` arguments that name meshload as a requirement to fetch from an index (``meshload``,
    ``"meshload==1.0"``, ``meshload[flash]``), rather than a file."""
    found = []
    for command in re.findall(r"pip install\b[^&;\n]*", text):
        for arg in command.split()[2:]:
            arg = arg.strip("'\"")
            if re.fullmatch(r"meshload(\[[^\]]*\])?([<>=!~].*)?", arg):
                found.append(arg)
    return found


def _load(name: str) -> dict:
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


def ray_up_checks(config: dict) -> dict:
    """Ray's config checks, in ``ray up``'s order; returns the prepared config or raises Ray's error."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bpip install\b", c)]


# -- launcher YAMLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validator(name):
    prepared = ray_up_checks(_load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # meshload (the wheel shipped from ./dist), the torch pin and this Ray's version are installed on the
    # head and on every worker, in the environment that then starts Ray (so `meshload` is on a job
    # entrypoint's PATH).
    for role in ("head", "worker"):
        installs = " ".join(_pip_installs(prepared[f"{role}_setup_commands"]))
        for pin in (TORCH_PIN, RAY_PIN):
            assert f'"{pin}"' in installs, (role, pin, installs)
        assert f"~/meshload-dist/{WHEEL}" in installs and f"--force-reinstall --no-deps ~/meshload-dist/{WHEEL}" in installs
        assert by_name_installs(installs) == [], installs
        for command in prepared[f"{role}_start_ray_commands"]:
            if "ray start" in command:
                assert command.startswith("source ~/meshload-venv/bin/activate"), command
    assert prepared["file_mounts"] == {"~/meshload-dist": "./dist"}  # the build, from where `ray up` runs


def test_local_config_through_ray_up_bootstrap():
    """The whole of ``ray up``'s config bootstrap (offline for the local provider): every host kept."""
    from ray.autoscaler._private.commands import _bootstrap_config

    config = _load("onprem-local.yaml")
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    (node_type,) = resolved["available_node_types"].values()
    num_hosts = len(config["provider"]["worker_ips"])
    assert (node_type["min_workers"], node_type["max_workers"]) == (num_hosts, num_hosts)
    assert "--head" in " ".join(resolved["head_start_ray_commands"])


def test_aws_config_has_gpu_worker_types_and_a_gpu_free_head():
    prepared = ray_up_checks(_load("aws-gpu.yaml"))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "ranks must not land on the head"
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert node_type["min_workers"] <= node_type["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) >= 2, "a multi-node load needs >= 2 GPU nodes up front"
    # Ray's fallback AMI (Ubuntu 18.04, CUDA 11.2) cannot run torch 2.13: every node type names one.
    for name, node_type in types.items():
        assert str(node_type["node_config"].get("ImageId", "")).startswith("ami-"), name


BROKEN_LAUNCHER_COPIES = {
    "misspelled top-level key": (
        lambda c: c.update(setup_command=c.pop("setup_commands")), jsonschema.ValidationError, "setup_command"),
    "GPU count as a string": (
        lambda c: c["available_node_types"]["gpu_4x_a10g"]["resources"].update(GPU="4"), jsonschema.ValidationError, "'4'"),
    "head type that does not exist": (
        lambda c: c.update(head_node_type="gpu-head"), ValueError, "head_node_type"),
    "more min_workers than max_workers": (
        lambda c: c.update(max_workers=1), ValueError, "max_workers"),
}


@pytest.mark.parametrize("what", sorted(BROKEN_LAUNCHER_COPIES))
def test_rays_validator_rejects_a_broken_copy(what):
    mutate, error, message = BROKEN_LAUNCHER_COPIES[what]
    config = _load("aws-gpu.yaml")
    ray_up_checks(config)  # the shipped one passes ...
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):  # ... the broken copy does not
        ray_up_checks(config)


def test_rays_validator_rejects_a_local_config_without_worker_ips():
    import click

    config = _load("onprem-local.yaml")
    del config["provider"]["worker_ips"]
    with pytest.raises(click.ClickException, match="worker_ips"):
        ray_up_checks(config)


# -- KubeRay ----------------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group.get("template", {}).get("spec", {}).get("containers", [])


def kuberay_problems(manifest: dict, *, ray_version: str = ray.__version__, torch_pin: str = TORCH_PIN) -> list[str]:
    """What would keep a RayCluster from running meshload loads; empty when fine."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayCluster":
        problems.append(f"not a ray.io/v1 RayCluster: {manifest.get('apiVersion')} {manifest.get('kind')}")
    if not manifest.get("metadata", {}).get("name"):
        problems.append("metadata.name missing")
    spec = manifest.get("spec", {})
    if spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != this Ray {ray_version!r}")
    head = spec.get("headGroupSpec", {})
    workers = spec.get("workerGroupSpecs", [])
    groups = [("head", head)] + [(w.get("groupName", f"#{i}"), w) for i, w in enumerate(workers)]
    images = set()
    overwrite = manifest.get("metadata", {}).get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true"
    for name, group in groups:
        containers = _containers(group)
        if not containers:
            problems.append(f"group {name}: no container")
            continue
        ray_container = containers[0]
        image = ray_container.get("image", "")
        images.add(image)
        tag = image.rpartition(":")[2]
        if not tag.startswith(f"{ray_version}"):
            problems.append(f"group {name}: image {image!r} is not Ray {ray_version}")
        if overwrite:
            script = " ".join(ray_container.get("command", []) + ray_container.get("args", []))
            if "$KUBERAY_GEN_RAY_START_CMD" not in script:
                problems.append(f"group {name}: custom command never runs $KUBERAY_GEN_RAY_START_CMD (no ray start)")
            install = script.split("$KUBERAY_GEN_RAY_START_CMD")[0]
            if not re.search(rf'pip install\b.*"{re.escape(torch_pin)}"', install):
                problems.append(f"group {name}: {torch_pin} not pip-installed before ray start")
            if not re.search(rf"pip install\b.*/opt/meshload-dist/{re.escape(WHEEL)}", install):
                problems.append(f"group {name}: meshload not pip-installed from /opt/meshload-dist/{WHEEL} before ray start")
            if by_name_installs(install):
                problems.append(f"group {name}: pip-installs meshload by name from an index: {by_name_installs(install)}")
            mounts = {m.get("mountPath"): m.get("name") for m in ray_container.get("volumeMounts", [])}
            volume = next((v for v in group.get("template", {}).get("spec", {}).get("volumes", [])
                           if v.get("name") == mounts.get("/opt/meshload-dist")), {})
            if volume.get("configMap", {}).get("name") != "meshload-wheel":
                problems.append(f"group {name}: /opt/meshload-dist is not the ConfigMap meshload-wheel")
        pod = group.get("template", {}).get("spec", {})
        volumes = {v.get("name") for v in pod.get("volumes", [])}
        for mount in ray_container.get("volumeMounts", []):
            if mount.get("name") not in volumes:
                problems.append(f"group {name}: volumeMount {mount.get('name')!r} has no volume")
    if len(images) > 1:
        problems.append(f"head and workers run different images: {sorted(images)}")
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("head advertises CPUs: ranks could land on the (GPU-less) head")
    head_ports = {p.get("containerPort") for c in _containers(head) for p in c.get("ports", [])}
    if 8265 not in head_ports:
        problems.append("head does not expose the dashboard port 8265 (ray job submit)")
    if not workers:
        problems.append("no worker groups")
    names = [w.get("groupName") for w in workers]
    if len(set(names)) != len(names):
        problems.append(f"duplicate worker group names: {names}")
    for w in workers:
        name = w.get("groupName")
        resources = (_containers(w) or [{}])[0].get("resources", {})
        limit = resources.get("limits", {}).get("nvidia.com/gpu")
        request = resources.get("requests", {}).get("nvidia.com/gpu")
        if limit is None or int(limit) < 1:
            problems.append(f"worker group {name}: no nvidia.com/gpu limit")
        elif request is not None and str(request) != str(limit):
            problems.append(f"worker group {name}: nvidia.com/gpu request {request} != limit {limit}")
        lo, n, hi = w.get("minReplicas", 0), w.get("replicas", 0), w.get("maxReplicas", 0)
        if not lo <= n <= hi:
            problems.append(f"worker group {name}: replicas {n} outside [{lo}, {hi}]")
        mounts = {m.get("mountPath") for m in (_containers(w) or [{}])[0].get("volumeMounts", [])}
        if "/dev/shm" not in mounts:
            problems.append(f"worker group {name}: no /dev/shm volume (Ray's object store would be 64 MB)")
    return problems


def test_kuberay_manifest_is_a_gpu_raycluster_for_this_ray():
    manifest = _load(KUBERAY)
    assert kuberay_problems(manifest) == []
    assert sum(w["replicas"] for w in manifest["spec"]["workerGroupSpecs"]) >= 2


def _kuberay_worker(m: dict) -> dict:
    return m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


BROKEN_KUBERAY_COPIES = {
    "worker group without GPUs": (
        lambda m: _kuberay_worker(m)["resources"]["limits"].pop("nvidia.com/gpu"), "no nvidia.com/gpu limit"),
    "worker image of another Ray": (
        lambda m: _kuberay_worker(m).update(image="rayproject/ray:2.9.0-py311-gpu"), "is not Ray"),
    "rayVersion not this Ray": (
        lambda m: m["spec"].update(rayVersion="2.9.0"), "rayVersion '2.9.0'"),
    "ray start dropped from the custom command": (
        lambda m: _kuberay_worker(m).update(args=[f'pip install "torch==2.13.0" /opt/meshload-dist/{WHEEL}']), "never runs"),
    "meshload not installed": (
        lambda m: _kuberay_worker(m).update(args=["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD"]), "meshload not pip-installed"),
    "meshload by name from the index": (
        lambda m: _kuberay_worker(m).update(args=[
            f'pip install "torch==2.13.0" /opt/meshload-dist/{WHEEL} "meshload" && $KUBERAY_GEN_RAY_START_CMD']),
        "pip-installs meshload by name"),
    "wheel folder not the ConfigMap": (
        lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][-1].update(
            configMap={"name": "someone-elses"}), "is not the ConfigMap meshload-wheel"),
    "head takes ranks": (
        lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "head advertises CPUs"),
    "replicas above maxReplicas": (
        lambda m: m["spec"]["workerGroupSpecs"][0].update(replicas=9), "outside"),
}


@pytest.mark.parametrize("what", sorted(BROKEN_KUBERAY_COPIES))
def test_kuberay_check_rejects_a_broken_copy(what):
    mutate, message = BROKEN_KUBERAY_COPIES[what]
    manifest = _load(KUBERAY)
    mutate(manifest)
    problems = kuberay_problems(manifest)
    assert any(message in p for p in problems), problems


# -- runtime_env ------------------------------------------------------------------------------------


def test_runtime_env_loads_as_ray_job_submit_reads_it():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    raw = parse_runtime_env_args(runtime_env=os.path.join(CONFIGS, RUNTIME_ENV))  # `--runtime-env FILE`
    assert set(raw) <= RuntimeEnv.known_fields, sorted(set(raw) - RuntimeEnv.known_fields)
    env = RuntimeEnv(**raw)  # Ray's own type checks (env_vars must be str -> str, pip a list or dict)
    assert not env.has_pip() and not env.has_conda() and "py_modules" not in raw  # meshload comes from the nodes
    assert by_name_installs(open(os.path.join(CONFIGS, RUNTIME_ENV)).read()) == []
    assert env.env_vars()["PYTHONUNBUFFERED"] == "1"


def test_no_config_installs_meshload_by_name():
    for name in sorted(os.listdir(CONFIGS)):
        with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
            assert by_name_installs(f.read()) == [], name
    assert by_name_installs('pip install "torch==2.13.0" meshload') == ["meshload"]  # the check sees one
    assert by_name_installs("pip install meshload==0.1.0 x") == ["meshload==0.1.0"]


def test_make_wheel_builds_the_file_the_configs_install(tmp_path):
    """What ``make wheel`` runs, into a temporary folder: the file name every config names, with this
    checkout's code in it."""
    import subprocess
    import sys
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), REPO],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert os.listdir(tmp_path) == [WHEEL]
    with zipfile.ZipFile(tmp_path / WHEEL) as wheel:
        with open(os.path.join(REPO, "planning", "confinement.py"), "rb") as f:
            assert wheel.read("planning/confinement.py") == f.read()
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        assert "-m pip wheel --quiet --no-deps --wheel-dir dist ." in f.read()


def test_runtime_env_check_rejects_a_broken_copy():
    from ray.runtime_env import RuntimeEnv

    raw = _load(RUNTIME_ENV)
    raw["env_vars"]["PYTHONUNBUFFERED"] = 1  # unquoted in YAML: an int
    with pytest.raises(TypeError, match="env_vars"):
        RuntimeEnv(**raw)


# -- documentation ----------------------------------------------------------------------------------


def test_readme_documents_every_cluster_config():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "## Running on a cluster" in readme
    section = readme.split("## Running on a cluster", 1)[1]
    for name in sorted(os.listdir(CONFIGS)):
        assert f"cluster_configs/{name}" in section, name
    for command in ("ray up", "kubectl apply", "ray job submit --address", "--runtime-env", "meshload load"):
        assert command in section, command


# -- preloaded workers ------------------------------------------------------------------------------


def _ray_starts(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_nodes_preload_what_a_rank_imports_and_start_their_idle_workers(name):
    from workers.preload import preload_env

    config = _load(name)
    ((key, value),) = preload_env().items()
    starts = _ray_starts(config)
    assert starts and all(f"{key}={value} ray start" in c for c in starts), starts
    workers = config["worker_start_ray_commands"]
    start = next(i for i, c in enumerate(workers) if "ray start" in c)
    assert any("ray.init(address='auto')" in c for c in workers[start + 1:]), "no driver connects after the worker's ray start"


def test_kuberay_worker_groups_preload_what_a_rank_imports():
    from workers.preload import preload_env

    ((key, value),) = preload_env().items()
    for group in _load(KUBERAY)["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert {"name": key, "value": value} in container["env"], group["groupName"]


def test_the_preloaded_modules_import_in_a_fresh_process():
    import subprocess
    import sys

    from workers.preload import PRELOAD_MODULES

    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; from workers.preload import preloaded; assert preloaded()"
    subprocess.run([sys.executable, "-c", code, *PRELOAD_MODULES], check=True, cwd=REPO)
