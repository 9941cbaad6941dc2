"""Renders and lints deploy/helm/walden with a real helm for every mode, and checks the objects.

    check_chart.py HELM CHART METRICS_MD OUT

Each walden.toml rendered is written to OUT as CASE-PIPELINE.toml, with the WALDEN_* variables
its Secret holds as CASE-PIPELINE.env.json, for the Rust side to load as walden's config.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

helm, chart, metrics_md, out = sys.argv[1:5]
documented = set(re.findall(r"^\| `(walden_[a-z_]+)`", open(metrics_md).read(), re.M))


def family(series):
    """The documented metric a series belongs to: a histogram's series are its name with
    _bucket, _sum or _count."""
    base = re.sub(r"_(bucket|sum|count)$", "", series)
    return base if base in documented else series


CASES = {
    "deployment": {
        "secret": {"env": {"WALDEN_SOURCE__URL": "postgres://walden:pw@db:5432/app"}},
    },
    "pipelines": {
        "secret": {"existingSecret": "walden-credentials"},
        "pipelines": [
            {"name": "orders", "config": {"source": {"slot": "orders", "publication": "orders"},
                                          "warehouse": {"url": "s3://lake/orders",
                                                        "storage_options": {"aws_region": "eu-west-1"}}}},
            {"name": "billing", "existingSecret": "billing-credentials",
             "config": {"source": {"slot": "billing", "publication": "billing"},
                        "warehouse": {"url": "s3://lake/billing"}}},
        ],
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
    "sidecar": {
        "mode": "sidecar",
        "secret": {"env": {"WALDEN_SOURCE__URL": "postgres://walden@127.0.0.1:5432/app"}},
        "sidecar": {"podSelector": {"cluster-name": "main-db"}},
        "serviceMonitor": {"enabled": True},
        "pipelines": [
            {"name": "a", "config": {"source": {"slot": "a"}, "warehouse": {"url": "gs://lake/a"}}},
            {"name": "b", "config": {"source": {"slot": "b"}, "warehouse": {"url": "gs://lake/b"}}},
        ],
    },
}


def helm_run(*args):
    r = subprocess.run([helm, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"helm {' '.join(args)}:\n{r.stdout}{r.stderr}"
    return r.stdout


def check(cond, what):
    assert cond, what


def container_checks(c, port, case):
    check(c["args"][:3] == ["run", "--config", "/etc/walden/walden.toml"], f"{case}: args {c['args']}")
    check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}, f"{case}: liveness")
    check(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}, f"{case}: readiness")
    check(c["ports"][0]["containerPort"] == port, f"{case}: port")
    sc = c["securityContext"]
    check(sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], f"{case}: security")
    check(sc["capabilities"]["drop"] == ["ALL"], f"{case}: capabilities")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    check({"/etc/walden", "/var/lib/walden/spill", "/tmp"} <= set(mounts), f"{case}: mounts {mounts}")
    check("limits" in c["resources"] and "requests" in c["resources"], f"{case}: resources")
    check("secretRef" in c["envFrom"][0], f"{case}: secrets from a Secret")


with tempfile.TemporaryDirectory() as tmp:
    for case, values in CASES.items():
        vf = os.path.join(tmp, case + ".yaml")
        with open(vf, "w") as f:
            yaml.safe_dump(values, f)
        helm_run("lint", "--strict", chart, "-f", vf)
        docs = [d for d in yaml.safe_load_all(helm_run("template", "rel", chart, "-f", vf)) if d]
        by_kind = {}
        for d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in by_kind.get("Secret", [])}
        configs = {c["metadata"]["name"]: c["data"] for c in by_kind.get("ConfigMap", [])}
        pipelines = values.get("pipelines", [{"name": "main"}])
        if values.get("mode", "deployment") == "deployment":
            deps = by_kind["Deployment"]
            check(len(deps) == len(pipelines), f"{case}: one Deployment per pipeline")
            for d, p in zip(deps, pipelines):
                spec = d["spec"]
                check(spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate",
                      f"{case}: one replica, Recreate")
                pod = spec["template"]["spec"]
                check(pod["terminationGracePeriodSeconds"] >= 60, f"{case}: grace period")
                check(pod["securityContext"]["runAsNonRoot"], f"{case}: non-root")
                vols = {v["name"]: v for v in pod["volumes"]}
                check(any("emptyDir" in v for v in vols.values()), f"{case}: emptyDir spill")
                (c,) = pod["containers"]
                container_checks(c, 9187, case)
                secret = c["envFrom"][0]["secretRef"]["name"]
                want = p.get("existingSecret") or values["secret"].get("existingSecret")
                if want:
                    check(secret == want and secret not in secrets, f"{case}: existing secret {secret}")
                else:
                    check(secret in secrets, f"{case}: secret {secret} rendered")
            check(len(by_kind["Service"]) == len(pipelines), f"{case}: a Service per pipeline")
        else:
            check("Deployment" not in by_kind, f"{case}: no Deployment in sidecar mode")
            for i, p in enumerate(pipelines):
                side = configs[f"rel-walden-{p['name']}-sidecar"]
                (c,) = yaml.safe_load(side["container.yaml"])
                container_checks(c, 9187 + i, case)
                vols = {v["name"] for v in yaml.safe_load(side["volumes.yaml"])}
                check({m["name"] for m in c["volumeMounts"]} <= vols, f"{case}: volumes for mounts")
                env = secrets[c["envFrom"][0]["secretRef"]["name"]]
                check("@127.0.0.1:" in env["WALDEN_SOURCE__URL"], f"{case}: Postgres over loopback")
            (svc,) = by_kind["Service"]
            check(svc["spec"]["selector"] == values["sidecar"]["podSelector"], f"{case}: selector")
            check([x["port"] for x in svc["spec"]["ports"]] == [9187, 9188], f"{case}: ports")
        if values.get("serviceMonitor", {}).get("enabled"):
            (sm,) = by_kind["ServiceMonitor"]
            check(all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"]), f"{case}: monitor")
        if values.get("prometheusRule", {}).get("enabled"):
            (rule,) = by_kind["PrometheusRule"]
            for r in rule["spec"]["groups"][0]["rules"]:
                used = {family(m) for m in re.findall(r"walden_[a-z_]+", r["expr"])}
                check(used and used <= documented, f"{case}: {r['alert']} uses {used - documented}")
        for p in pipelines:
            name = f"rel-walden-{p['name']}"
            with open(os.path.join(out, f"{case}-{p['name']}.toml"), "w") as f:
                f.write(configs[name + "-config"]["walden.toml"])
            with open(os.path.join(out, f"{case}-{p['name']}.env.json"), "w") as f:
                json.dump(secrets.get(name, {"WALDEN_SOURCE__URL": "postgres://x@db/app"}), f)
        print(f"{case}: {len(docs)} objects checked, linted")
