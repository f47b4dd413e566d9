#!/usr/bin/env python3
"""Validate Kubernetes manifests offline; called by control/tests/manifests.rs.

usage: validate_manifests.py K8S_VERSION FILE...

Built-in kinds are checked with kubernetes-validate (strict: unknown fields
are errors) against the schemas of K8S_VERSION. Custom resources are
checked against the openAPIV3Schema of their CustomResourceDefinition,
taken from the same files, the way the API server does with kubectl's
default strict field validation: unknown fields are errors unless the
schema preserves them. Prints one JSON object per document on stdout:
{"file", "doc", "kind", "name", "status": "ok"|"error"|"skipped", "message"}.
Exits 0 when it could run (whatever the verdicts), 2 on a usage error.
"""

import copy
import json
import sys

import jsonschema
import kubernetes_validate
import yaml


def openapi_to_jsonschema(s, root=False):
    """OpenAPI v3 (Kubernetes structural schema) to JSON Schema."""
    if not isinstance(s, dict):
        return s
    s = copy.deepcopy(s)
    for key in ("properties", "patternProperties"):
        if key in s:
            s[key] = {k: openapi_to_jsonschema(v) for k, v in s[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = openapi_to_jsonschema(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [openapi_to_jsonschema(x) for x in s[key]]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if root:
        props = s.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        s.get("type") == "object"
        and "properties" in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        s["additionalProperties"] = False
    return s


def crd_schemas(docs):
    """(apiVersion, kind) -> JSON Schema, from the CRDs among the documents."""
    out = {}
    for _, _, d in docs:
        if not isinstance(d, dict) or d.get("kind") != "CustomResourceDefinition":
            continue
        spec = d.get("spec") or {}
        group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
        for v in spec.get("versions") or []:
            schema = ((v.get("schema") or {}).get("openAPIV3Schema")) or {}
            out[(f"{group}/{v.get('name')}", kind)] = openapi_to_jsonschema(schema, root=True)
    return out


def first_error(validator, doc):
    errs = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if not errs:
        return None
    e = errs[0]
    path = ".".join(str(p) for p in e.absolute_path) or "(root)"
    return f"{path}: {e.message}"


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    version, files = argv[1], argv[2:]
    docs = []
    results = []
    for f in files:
        try:
            with open(f) as fh:
                for i, d in enumerate(yaml.safe_load_all(fh)):
                    if d is not None:
                        docs.append((f, i + 1, d))
        except (OSError, yaml.YAMLError) as e:
            results.append({"file": f, "doc": 0, "kind": "", "name": "", "status": "error",
                            "message": f"not readable YAML: {e}"})
    crds = crd_schemas(docs)
    for f, i, d in docs:
        r = {"file": f, "doc": i, "kind": "", "name": "", "status": "ok", "message": ""}
        results.append(r)
        if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
            r.update(status="error", message="not a Kubernetes object (apiVersion and kind are required)")
            continue
        r["kind"] = d["kind"]
        r["name"] = str((d.get("metadata") or {}).get("name", ""))
        if not r["name"]:
            r.update(status="error", message="metadata.name is missing")
            continue
        key = (d["apiVersion"], d["kind"])
        if key in crds:
            msg = first_error(jsonschema.Draft202012Validator(crds[key]), d)
            if msg:
                r.update(status="error", message=f"does not match its CRD's schema: {msg}")
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            r.update(status="skipped",
                     message=f"no schema for {d['apiVersion']} {d['kind']} in Kubernetes {version} or in the CRDs given")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            r.update(status="error", message=f"{path}: {e.message}")
        except Exception as e:  # a bad schema or version: say so, per document
            r.update(status="error", message=f"{type(e).__name__}: {e}")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
