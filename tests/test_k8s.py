"""The Kubernetes manifests (deploy/k8s), checked offline: no cluster runs here.

deploy/k8s/validate.py renders each kustomization with `kubectl kustomize` and checks every object
against the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict: unknown fields are
errors), that the kustomizations list exactly their files, and that what the objects refer to
exists. Here: the real manifests pass and have what the launcher promises; broken copies fail,
each naming its problem.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.k8s

K8S = REPO / "deploy" / "k8s"


def _validator():
    spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _validator()


def rendered(kdir: Path) -> dict[str, dict]:
    out = subprocess.run(["kubectl", "kustomize", str(kdir)], capture_output=True, text=True, check=True).stdout
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(out) if o}


def test_the_manifests_pass_the_validator():
    r = subprocess.run([sys.executable, str(K8S / "validate.py")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "objects valid against the Kubernetes 1.29.0 and 1.37.0 schemas (strict)" in r.stdout


def test_the_manifests_hold_what_the_launcher_promises():
    objs = {**rendered(K8S), **rendered(K8S / "finalize")}
    assert {o["metadata"].get("namespace") for k, o in objs.items() if not k.startswith("Namespace/")} == {"hpsearch"}
    assert {"StatefulSet/hpsearch-db", "Service/hpsearch-db", "Deployment/hpsearch-proxy", "Service/hpsearch-proxy",
            "Job/hpsearch-workers", "Deployment/hpsearch-dashboard", "Service/hpsearch-dashboard",
            "Secret/hpsearch-db", "Job/hpsearch-finalize", "PersistentVolumeClaim/hpsearch-reports"} <= set(objs)

    workers = objs["Job/hpsearch-workers"]["spec"]
    assert workers["completionMode"] == "Indexed" and workers["parallelism"] == workers["completions"]
    pod = workers["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > validate.WORKER_STOP_SECONDS
    worker = pod["containers"][0]
    assert worker["args"][:1] == ["worker"] and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Workers go through the proxy and never hold the database password.
    assert {e["name"]: e.get("value") for e in worker["env"]}["HPSEARCH_STORAGE"] == "$(HPSEARCH_PROXY)"
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in worker["env"])

    assert objs["Service/hpsearch-dashboard"]["spec"]["type"] == "ClusterIP"
    assert objs["Secret/hpsearch-db"]["stringData"]["POSTGRES_PASSWORD"].startswith("EXAMPLE-ONLY")
    # No password on any command line: the URL is assembled in the environment.
    for o in objs.values():
        for t in validate.pod_templates(o):
            for c in t["spec"]["containers"]:
                assert not any("POSTGRES_PASSWORD" in a for a in c.get("args", []) + c.get("command", []))

    finalize = objs["Job/hpsearch-finalize"]["spec"]["template"]["spec"]
    args = finalize["containers"][0]["args"]
    out = args[args.index("--out") + 1]
    mounts = {m["mountPath"]: m["name"] for m in finalize["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in finalize["volumes"]}
    assert claims[mounts[out]] == "hpsearch-reports", "finalize writes its report to the reports volume"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


BROKEN = {
    "misspelt field": ("workers.yaml", "  parallelism: 4", "  paralelism: 4",
                       "Job/hpsearch-workers: spec: Additional properties are not allowed ('paralelism'"),
    "wrong type": ("workers.yaml", "completions: 4 ", "completions: four ",
                   "Job/hpsearch-workers: spec.completions: 'four' is not of type 'integer'"),
    "file left out of the kustomization": ("kustomization.yaml", "  - dashboard.yaml\n", "",
                                           "dashboard.yaml is in no kustomization"),
    "undefined variable": ("dashboard.yaml", "@$(POSTGRES_HOST):", "@$(POSTGRES_HOTS):",
                           "env HPSEARCH_STORAGE uses $(POSTGRES_HOTS), which is not defined before it"),
    "missing secret key": ("proxy.yaml", "key: POSTGRES_DB}", "key: POSTGRES_DATABASE}",
                           "env POSTGRES_DB reads hpsearch-db/POSTGRES_DATABASE, which is not defined"),
    "service selects nothing": ("proxy.yaml", "  selector:\n    app.kubernetes.io/name: hpsearch-proxy\n",
                                "  selector:\n    app.kubernetes.io/name: hpsearch-proxi\n",
                                "Service/hpsearch-proxy: its selector {'app.kubernetes.io/name': 'hpsearch-proxi'} "
                                "matches no pod template"),
    "grace too short": ("workers.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 20",
                        "Job/hpsearch-workers: terminationGracePeriodSeconds 20 must exceed the worker's stop time"),
    "unknown claim": ("finalize/job.yaml", "claimName: hpsearch-reports", "claimName: hpsearch-report",
                      "volume reports uses claim hpsearch-report, which is not defined"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_fails_naming_its_problem(tmp_path, case):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    file, old, new, expected = BROKEN[case]
    _edit(copy / file, old, new)
    problems, _ = validate.check(copy)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"


def test_a_missing_file_and_bad_yaml_fail(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (copy / "config.yaml").unlink()
    (copy / "secret.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: x\n")
    problems, _ = validate.check(copy)
    text = "\n".join(problems)
    assert "kustomization.yaml lists config.yaml, which does not exist" in text
    assert "secret.yaml: not YAML" in text
    r = subprocess.run([sys.executable, str(K8S / "validate.py"), str(copy)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "problem(s) in" in r.stderr
