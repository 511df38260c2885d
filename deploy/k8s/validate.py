"""Check the Kubernetes manifests offline, with no cluster.

    uv run python deploy/k8s/validate.py [DIR]      # DIR: default, the folder of this script

1. Every kustomization.yaml lists exactly the YAML files beside it (none forgotten, none missing).
2. Every object in every file, and every object `kubectl kustomize` renders, passes the Kubernetes
   OpenAPI schema of the oldest and the newest version in KUBERNETES_VERSIONS, strictly (an
   unknown or misspelt field is an error): the schemas ship inside kubernetes-validate.
3. What the objects name exists: the Secrets, ConfigMaps and volume claims pods use, the pods a
   Service selects, the named ports it targets, and every $(VAR) in a container's args or env.
4. Pods that run `hpsearch worker` give it longer than its stop time before SIGKILL.

Prints one line per problem and exits 1, or prints a summary and exits 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
WORKER_STOP_SECONDS = 30  # a worker re-queues its trial and exits within this after SIGTERM
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
AUTO_ENV = {"JOB_COMPLETION_INDEX"}  # set by Kubernetes in Indexed Jobs' pods


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_problems(obj: dict, where: str) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            at = ".".join(str(p) for p in e.path) or "(top level)"
            problems.append(f"{where}: {name_of(obj)}: {at}: {e.message} (Kubernetes {version} schema)")
        except (kubernetes_validate.SchemaNotFoundError, KeyError, TypeError) as e:
            problems.append(f"{where}: {name_of(obj)}: no schema for it in Kubernetes {version}: {e}")
    return problems


def kustomization_problems(kdir: Path) -> tuple[list[str], list[Path]]:
    """Is the resource list exactly the YAML files beside kustomization.yaml?"""
    listed = load(kdir / "kustomization.yaml")[0].get("resources", [])
    files = {p.name for p in kdir.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml"}
    problems = [f"{kdir}/kustomization.yaml lists {r}, which does not exist" for r in listed if r not in files]
    problems += [f"{kdir}/{f} is in no kustomization (add it to resources in {kdir}/kustomization.yaml)"
                 for f in sorted(files - set(listed))]
    return problems, [kdir / r for r in listed if r in files]


def render(kdir: Path) -> tuple[list[str], list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return ["kubectl not found: it renders the kustomizations (Debian: apt-get install kubernetes-client)"], []
    r = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return [f"{kdir}: kubectl kustomize failed: {r.stderr.strip()}"], []
    return [], [doc for doc in yaml.safe_load_all(r.stdout) if doc is not None]


def pod_templates(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj.get("kind") in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return [spec.get("template", {})]
    if obj.get("kind") == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {})]
    return [{"metadata": obj.get("metadata", {}), "spec": spec}] if obj.get("kind") == "Pod" else []


def reference_problems(objs: list[dict]) -> list[str]:
    """Names that must exist among `objs` (all kustomizations rendered, as applied together)."""
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    secrets, configmaps = by_kind.get("Secret", {}), by_kind.get("ConfigMap", {})
    claims = set(by_kind.get("PersistentVolumeClaim", {}))
    problems = []
    templates = [(o, t) for o in objs for t in pod_templates(o)]
    for o, t in templates:
        pod = t.get("spec", {})
        claims_here = claims | {c["metadata"]["name"] for c in o.get("spec", {}).get("volumeClaimTemplates", [])}
        for v in pod.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims_here:
                problems.append(f"{name_of(o)}: volume {v['name']} uses claim {claim}, which is not defined")
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            problems += container_problems(o, c, secrets, configmaps)
        runs_worker = any(c.get("args", [])[:1] == ["worker"] for c in pod.get("containers", []))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if runs_worker and grace <= WORKER_STOP_SECONDS:
            problems.append(f"{name_of(o)}: terminationGracePeriodSeconds {grace} must exceed the worker's "
                            f"stop time ({WORKER_STOP_SECONDS} s), or SIGKILL can cut off the trial's re-queue")
    for svc in by_kind.get("Service", {}).values():
        problems += service_problems(svc, templates)
    return problems


def container_problems(o: dict, c: dict, secrets: dict, configmaps: dict) -> list[str]:
    where, problems, defined = f"{name_of(o)} container {c['name']}", [], set(AUTO_ENV)
    for src in c.get("envFrom", []):
        for kind, table in (("secretRef", secrets), ("configMapRef", configmaps)):
            if kind in src:
                ref = table.get(src[kind]["name"])
                if ref is None:
                    problems.append(f"{where}: envFrom {kind} {src[kind]['name']} is not defined")
                else:
                    defined |= set(ref.get("data", {})) | set(ref.get("stringData", {}))
    for e in c.get("env", []):
        for kind, table in (("secretKeyRef", secrets), ("configMapKeyRef", configmaps)):
            ref = e.get("valueFrom", {}).get(kind)
            if ref:
                target = table.get(ref["name"])
                keys = set(target.get("data", {})) | set(target.get("stringData", {})) if target else set()
                if ref["key"] not in keys:
                    problems.append(f"{where}: env {e['name']} reads {ref['name']}/{ref['key']}, which is not defined")
        # $(VAR) in a value expands only variables defined before it.
        problems += [f"{where}: env {e['name']} uses $({v}), which is not defined before it"
                     for v in VAR.findall(e.get("value", "")) if v not in defined]
        defined.add(e["name"])
    for arg in c.get("command", []) + c.get("args", []):
        problems += [f"{where}: argument {arg!r} uses $({v}), which is not defined"
                     for v in VAR.findall(arg) if v not in defined]
    return problems


def service_problems(svc: dict, templates: list[tuple[dict, dict]]) -> list[str]:
    selector = svc["spec"].get("selector", {})
    chosen = [(o, t) for o, t in templates
              if selector and selector.items() <= t.get("metadata", {}).get("labels", {}).items()]
    if not chosen:
        return [f"{name_of(svc)}: its selector {selector} matches no pod template"]
    ports = {p.get("name") for _, t in chosen for c in t["spec"].get("containers", []) for p in c.get("ports", [])}
    return [f"{name_of(svc)}: targetPort {p['targetPort']} is no named port of the pods it selects"
            for p in svc["spec"].get("ports", []) if isinstance(p.get("targetPort"), str) and p["targetPort"] not in ports]


def check(root: Path) -> tuple[list[str], int]:
    problems, rendered, count = [], [], 0
    kdirs = sorted(p.parent for p in root.rglob("kustomization.yaml"))
    if not kdirs:
        return [f"{root}: no kustomization.yaml"], 0
    for kdir in kdirs:
        listed_problems, files = kustomization_problems(kdir)
        problems += listed_problems
        for f in files:
            try:
                objs = load(f)
            except yaml.YAMLError as e:
                problems.append(f"{f}: not YAML: {str(e).splitlines()[0]}")
                continue
            for obj in objs:
                problems += schema_problems(obj, str(f))
        render_problems, objs = render(kdir)
        problems += render_problems
        for obj in objs:
            problems += schema_problems(obj, f"{kdir} (rendered)")
        rendered += objs
        count += len(objs)
    if rendered:
        problems += reference_problems(rendered)
    return problems, count


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    problems, count = check(root)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in {root}", file=sys.stderr)
        return 1
    print(f"{root}: {count} objects valid against the Kubernetes {' and '.join(KUBERNETES_VERSIONS)} "
          f"schemas (strict), references resolved")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
