"""The Helm chart's test tool: drives the real Helm v4 SDK (helm-python-sdk, which binds Helm's Go
SDK through its bundled libhelm_c, no helm binary), kubernetes-validate and checkov, and prints one
JSON document on stdout for the Rust tests in tests/tests/helm_chart.rs to assert on.

Subcommands (every one takes the chart folder and, where it renders, a values file or none for the
chart's defaults):
  versions    the Kubernetes versions kubernetes-validate ships, and the Helm SDK's version
  lint        helm lint in strict mode at each --kube-version
  render      the rendered manifests, parsed, each with the template it came from
  validate    every rendered object against the Kubernetes schemas of each --kube-version (strict)
  checkov     checkov's Kubernetes checks over the rendered manifests of several value sets
  schema      validate a values document (JSON on stdin) against values.schema.json
  materialize reproduce the keygate pod's filesystem under a folder (see `materialize`)

Exit status: 0 when the JSON was printed (the findings are data for the caller to judge), 2 on a
usage or environment problem (a missing tool, a chart that cannot load), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

try:
    import helm_python as helm
except Exception as error:  # the native library may fail to load: say exactly why
    print(f"helm_chart.py: cannot load the Helm SDK (pip install helm-python-sdk): {error}", file=sys.stderr)
    sys.exit(2)


RELEASE = "keygate"


def load_values(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def render(chart_dir: str, values_file: str | None, namespace: str) -> dict[str, str]:
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(load_values(values_file), name=RELEASE, namespace=namespace, is_install=True)


def parsed_objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of the render, with the template it came from under `_template`."""
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document["_template"] = template
                objects.append(document)
    return objects


def cmd_lint(args: argparse.Namespace) -> dict[str, Any]:
    values = load_values(args.values)
    reports = {}
    for version in args.kube_version:
        reports[version] = helm.lint(args.chart, values, strict=True, namespace=args.namespace, kube_version=version)
    return {"reports": reports}


def cmd_render(args: argparse.Namespace) -> dict[str, Any]:
    manifests = render(args.chart, args.values, args.namespace)
    objects = parsed_objects(manifests)
    for obj in objects:
        if obj.get("kind") == "ConfigMap":
            # The files a ConfigMap carries (keygate.yaml, policy files), parsed for the assertions.
            obj["_parsed_data"] = {key: yaml.safe_load(text) for key, text in (obj.get("data") or {}).items()}
    return {
        "objects": objects,
        "notes": next((text for name, text in manifests.items() if name.endswith("NOTES.txt")), None),
    }


def shipped_versions() -> list[str]:
    """The Kubernetes versions kubernetes-validate has schemas for, oldest first."""
    from kubernetes_validate import utils as kubernetes_validate
    from packaging.version import Version

    return sorted(set(kubernetes_validate.all_versions()), key=Version)


def cmd_validate(args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes_validate import utils as kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    shipped = shipped_versions()
    objects = parsed_objects(render(args.chart, args.values, args.namespace))
    results = []
    for version in args.kube_version:
        if version not in shipped:
            raise SystemExit(f"kubernetes-validate ships schemas for {shipped[0]}..{shipped[-1]}, not {version}")
        for obj in objects:
            template = obj.pop("_template")
            entry = {"version": version, "kind": obj.get("kind"), "name": obj.get("metadata", {}).get("name"),
                     "template": template, "error": None, "no_schema": False}
            try:
                validated = kubernetes_validate.validate(obj, version, strict=True)
                entry["validated_against"] = validated
            except ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                entry["error"] = f"{path}: {error.message}"
            except SchemaNotFoundError as error:
                entry["no_schema"] = True
                entry["error"] = error.message
            obj["_template"] = template
            results.append(entry)
    return {"shipped_versions": shipped, "results": results}


def cmd_versions(args: argparse.Namespace) -> dict[str, Any]:
    return {"kubernetes_validate": shipped_versions(), "helm_sdk": helm.helm_sdk_version(),
            "helm_c": helm.helm_c_version(), "helm_library": str(helm.library_path)}


def cmd_checkov(args: argparse.Namespace) -> dict[str, Any]:
    checkov = Path(sys.executable).with_name("checkov")
    if not checkov.is_file():
        raise SystemExit(f"checkov not found next to {sys.executable} (pip install checkov)")
    with tempfile.TemporaryDirectory(prefix="keygate-checkov-") as root:
        for index, values_file in enumerate(args.values):
            folder = Path(root) / f"set{index}"
            folder.mkdir()
            for template, text in render(args.chart, values_file or None, args.namespace).items():
                if template.endswith((".yaml", ".yml")) and text.strip():
                    (folder / template.replace("/", "__")).write_text(text, encoding="utf-8")
        env = dict(os.environ)
        # Offline: no platform calls, no version check.
        env.update({"BC_SKIP_MAPPING": "TRUE", "CHECKOV_SKIP_DOWNLOAD": "TRUE", "ENABLE_DEFINITION_KEY": "False"})
        proc = subprocess.run(
            [str(checkov), "--directory", root, "--framework", "kubernetes", "--output", "json",
             "--skip-download"],
            capture_output=True, text=True, env=env, check=False,
        )
        if not proc.stdout.strip():
            raise SystemExit(f"checkov printed nothing (exit {proc.returncode}): {proc.stderr[-4000:]}")
        report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed, skipped, passed = [], [], 0
    for rep in reports:
        if rep.get("check_type") not in (None, "kubernetes"):
            continue
        results = rep.get("results", {})
        passed += len(results.get("passed_checks", []))
        for check in results.get("failed_checks", []):
            failed.append({"id": check["check_id"], "name": check["check_name"], "resource": check["resource"],
                           "file": check["file_path"]})
        for check in results.get("skipped_checks", []):
            skipped.append({"id": check["check_id"], "resource": check["resource"],
                            "reason": (check.get("check_result") or {}).get("suppress_comment", "")})
    return {"passed": passed, "failed": failed, "skipped": skipped}


def cmd_schema(args: argparse.Namespace) -> dict[str, Any]:
    values = json.load(sys.stdin)
    with helm.Chart.load(args.chart) as chart:
        try:
            chart.validate_schema(values)
            return {"accepted": True, "message": ""}
        except helm.HelmValuesError as error:
            return {"accepted": False, "message": str(error)}


# --- the pod's filesystem ---------------------------------------------------------------------


def write_kubelet_volume(folder: Path, files: dict[str, str]) -> None:
    """Lays out files the way the kubelet does for a ConfigMap or Secret volume: the data in a
    timestamped folder, a `..data` symlink to it, and one symlink per key through `..data`."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text, encoding="utf-8")
    (folder / "..data").symlink_to(stamp.name)
    for name in files:
        (folder / name).symlink_to(f"..data/{name}")


def fixture_for(name: str, fixtures: Path) -> str:
    """Content for a key of a Secret or ConfigMap the chart only refers to (the installer creates
    it): the test's fixture file of that name (certificates, keys)."""
    candidate = fixtures / name
    if candidate.is_file():
        return candidate.read_text(encoding="utf-8")
    raise SystemExit(
        f"no test fixture for the key `{name}` of a Secret or ConfigMap the chart mounts; "
        f"add {candidate} in the Rust test that calls materialize"
    )


def cmd_materialize(args: argparse.Namespace) -> dict[str, Any]:
    """Reproduces the keygate container's filesystem under --root, from the rendered manifests:
    every volume mount of the keygate container becomes <root><mountPath>, filled as the kubelet
    would (ConfigMaps rendered by the chart with their data; Secrets and ConfigMaps the installer
    provides with the test's fixtures, for the keys the pod names or the configuration points at;
    emptyDir and PVC empty; the projected service-account token as a token file). The chart's
    keygate.yaml is then rewritten with every path under a mount prefixed by --root, and nothing
    else changed, so that `keygate config check` reads the configuration the pod would."""
    root = Path(args.root)
    fixtures = Path(args.fixtures)
    objects = parsed_objects(render(args.chart, args.values, args.namespace))
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in objects if o.get("kind") == "ConfigMap"}
    workloads = [o for o in objects if o.get("kind") in ("Deployment", "StatefulSet")]
    if len(workloads) != 1:
        raise SystemExit(f"expected one Deployment or StatefulSet in the render, found {len(workloads)}")
    pod = workloads[0]["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "keygate")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in workloads[0]["spec"].get("volumeClaimTemplates", [])}

    args_list = container.get("args", [])
    config_path = args_list[args_list.index("--config") + 1]
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)

    # The configuration text, found through the mount that holds it.
    config_text = None
    for mount in mounts:
        if config_path.startswith(mount["mountPath"] + "/"):
            volume = volumes[mount["name"]]
            key = config_path[len(mount["mountPath"]) + 1:]
            config_text = configmaps[volume["configMap"]["name"]][key]
            break
    if config_text is None:
        raise SystemExit(f"no volume mount of the keygate container holds {config_path}")

    mount_paths = [m["mountPath"] for m in mounts]
    pattern = re.compile("(?<![\\w/])(" + "|".join(re.escape(p) for p in mount_paths) + ")(?=[/\"'\\s]|$)", re.M)
    relocated = pattern.sub(lambda m: str(root) + m.group(1), config_text)
    original_tree, relocated_tree = yaml.safe_load(config_text), yaml.safe_load(relocated)
    check_only_paths_moved(original_tree, relocated_tree, str(root))
    referenced = [s[len("file://"):] if s.startswith("file://") else s for s in strings_in(original_tree)]

    for mount in mounts:
        target = root / mount["mountPath"].lstrip("/")
        volume = volumes.get(mount["name"])
        if volume is None and mount["name"] in claims:
            target.mkdir(parents=True, exist_ok=True)  # the StatefulSet's claim: an empty volume
            continue
        if volume is None:
            raise SystemExit(f"volume mount `{mount['name']}` has no volume")
        if "configMap" in volume or "secret" in volume:
            source = volume.get("configMap") or volume.get("secret")
            name = source.get("name") or source.get("secretName")
            keys = [item["path"] for item in source.get("items", [])]
            if "configMap" in volume and name in configmaps:
                data = configmaps[name]
                files = {item["path"]: data[item["key"]] for item in source["items"]} if keys else dict(data)
            else:
                # Provided by the installer: the keys the pod names, or else the files the
                # configuration points at inside this mount.
                if not keys:
                    prefix = mount["mountPath"] + "/"
                    keys = sorted({p[len(prefix):] for p in referenced if p.startswith(prefix)})
                files = {key: fixture_for(key, fixtures) for key in keys}
            write_kubelet_volume(target, files)
        elif "projected" in volume:
            files = {}
            for source in volume["projected"]["sources"]:
                if "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = "test-projected-service-account-token"
                else:
                    raise SystemExit(f"projected source {sorted(source)} is not reproduced by this test")
            write_kubelet_volume(target, files)
        elif "emptyDir" in volume or "persistentVolumeClaim" in volume:
            target.mkdir(parents=True, exist_ok=True)
        else:
            raise SystemExit(f"volume `{mount['name']}` of type {sorted(volume)} is not reproduced by this test")

    config_file = root / "keygate-config-check.yaml"
    config_file.write_text(relocated, encoding="utf-8")
    workload = workloads[0]
    suffix = "0" if workload["kind"] == "StatefulSet" else "7d9f8c6b5-x2x7q"
    env = container_env(container, f"{workload['metadata']['name']}-{suffix}", args.namespace)
    return {"config": str(config_file), "env": env, "config_path_in_pod": config_path,
            "rendered_config": config_text}


def container_env(container: dict[str, Any], pod_name: str, namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: literal values with `$(VAR)`
    references to earlier variables expanded, and the pod's name and namespace from fieldRefs.
    A keygate variable taken from a Secret or ConfigMap cannot be reproduced: refused."""
    env: dict[str, str] = {}
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
        elif "fieldRef" in entry.get("valueFrom", {}) and entry["valueFrom"]["fieldRef"]["fieldPath"] in fields:
            env[name] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        elif name.startswith("KEYGATE_"):
            raise SystemExit(f"{name} comes from {sorted(entry.get('valueFrom', {}))}: not reproduced by this test")
    return env


def strings_in(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in strings_in(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in strings_in(v)]
    return [tree] if isinstance(tree, str) else []


def check_only_paths_moved(original: Any, relocated: Any, root: str, where: str = "") -> None:
    """The relocated configuration must equal the chart's except for `root` put before paths."""
    if isinstance(original, dict) and isinstance(relocated, dict) and original.keys() == relocated.keys():
        for key in original:
            check_only_paths_moved(original[key], relocated[key], root, f"{where}.{key}")
        return
    if isinstance(original, list) and isinstance(relocated, list) and len(original) == len(relocated):
        for index, (a, b) in enumerate(zip(original, relocated)):
            check_only_paths_moved(a, b, root, f"{where}[{index}]")
        return
    if original == relocated:
        return
    if isinstance(original, str) and isinstance(relocated, str) and relocated.replace(root, "", 1) == original:
        return
    raise SystemExit(f"relocating paths changed `{where}` beyond its path prefix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, values: bool = True) -> None:
        p.add_argument("--chart", required=True)
        p.add_argument("--namespace", default="payments")
        if values:
            p.add_argument("--values", default=None, help="values file; none for the chart's defaults")

    p = sub.add_parser("versions"); p.set_defaults(run=cmd_versions)
    p = sub.add_parser("lint"); common(p); p.add_argument("--kube-version", action="append", required=True)
    p.set_defaults(run=cmd_lint)
    p = sub.add_parser("render"); common(p); p.set_defaults(run=cmd_render)
    p = sub.add_parser("validate"); common(p); p.add_argument("--kube-version", action="append", required=True)
    p.set_defaults(run=cmd_validate)
    p = sub.add_parser("checkov"); common(p, values=False)
    p.add_argument("--values", action="append", required=True, help="values file, or '' for the defaults")
    p.set_defaults(run=cmd_checkov)
    p = sub.add_parser("schema"); common(p, values=False); p.set_defaults(run=cmd_schema)
    p = sub.add_parser("materialize"); common(p)
    p.add_argument("--root", required=True); p.add_argument("--fixtures", required=True)
    p.set_defaults(run=cmd_materialize)

    args = parser.parse_args()
    try:
        result = args.run(args)
    except helm.HelmError as error:
        print(f"helm_chart.py {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(2)
    json.dump(result, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
