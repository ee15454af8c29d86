"""``python -m runtime deploy s3://…/<name>@sha256:… --endpoint-name E --image IMAGE --role ARN [--dry-run]``

Sizes the artifact, lists the SageMaker instance types that fit it (cheapest first), checks the chosen one against
the artifact's target block, stages the artifact as a directory tree beside its blobs (and each ``--adapter`` as a
``.tar.gz``), and creates or updates the SageMaker model, endpoint configuration, endpoint and, with
``--inference-components`` or adapters, the inference components. ``--dry-run`` reads the manifest, writes nothing
and prints the exact API calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from artifacts.errors import ArtifactError
from artifacts.manifest import Manifest
from artifacts.ops import load_manifest
from artifacts.s3 import S3Store, redact
from artifacts.s3_tree import StagedTree, stage_tarball, stage_tree
from artifacts.uri import ArtifactRef, parse_ref
from runtime.deploy import fit
from runtime.deploy.sagemaker import Adapter, Request, apply, name_problem, plan

SHOWN = 6  # fitting instance types listed


class DeployError(Exception):
    """A deployment that cannot go ahead: the message names what is wrong and the fix."""


@dataclass(frozen=True)
class Sized:
    manifest: Manifest
    instance: fit.Instance
    need: fit.Need  # on the chosen instance's device kind
    needs: dict[str, fit.Need]  # on each device kind the artifact runs on
    fitting: list[fit.Instance]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime deploy", description=__doc__)
    p.add_argument("model", help="the artifact: s3://bucket/prefix/<name>@sha256:<digest> or …:<tag>")
    p.add_argument("--endpoint-name", required=True, help="the SageMaker endpoint to create or update")
    p.add_argument("--image", required=True, help="kiln's runtime image in ECR (runtime/images/)")
    p.add_argument("--role", required=True, help="the execution role ARN SageMaker assumes (reads the S3 prefix)")
    p.add_argument("--instance-type", help="default: the cheapest instance type that fits")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--max-model-len", type=int, help="default: the artifact's target.max_model_len")
    p.add_argument("--max-num-seqs", type=int, help="default: the artifact's, else the engine's")
    p.add_argument("--adapter", action="append", default=[], metavar="URI", help="a LoRA adapter artifact (repeat)")
    p.add_argument("--inference-components", action="store_true", help="deploy as inference components")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container environment (repeat)")
    p.add_argument("--startup-timeout", type=int, default=1800, help="container start-up health check, seconds")
    p.add_argument("--region", help="AWS region (default: boto3's chain)")
    p.add_argument("--skip-fit-check", action="store_true", help="deploy to an instance type not in kiln's table")
    p.add_argument("--wait", action="store_true", help="wait until the endpoint and components are InService")
    p.add_argument("--dry-run", action="store_true", help="print the API calls; write nothing")
    return p


def main(argv: list[str], out: TextIO = sys.stdout) -> int:
    args = parser().parse_args(argv)
    try:
        return _deploy(args, out)
    except (DeployError, ArtifactError) as exc:
        print(f"kiln deploy: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__name__ in ("ClientError", "NoCredentialsError", "WaiterError", "ParamValidationError"):
            print(f"kiln deploy: SageMaker refused: {redact(str(exc))}", file=sys.stderr)
            return 1
        raise


def _deploy(args: argparse.Namespace, out: TextIO) -> int:
    if (why := name_problem(args.endpoint_name)) is not None:
        raise DeployError(f"--endpoint-name: {why}")
    ref, store = _s3_ref(args.model, "the model")
    ref, manifest = load_manifest(ref, store)
    if manifest.adapter is not None:
        raise DeployError(f"{ref} is a LoRA adapter: deploy its base model and pass this as --adapter")
    sized = size(manifest, _config(store, manifest), args)
    _report(ref, sized, out)
    adapters = [_adapter(uri, manifest, args.dry_run) for uri in args.adapter]
    tree = stage_tree(store, manifest, dry_run=args.dry_run)
    _report_tree(tree, args.dry_run, out)
    req = _request(args, sized, tree, tuple(adapters))
    calls = plan(req)
    if args.dry_run:
        print("dry run: the calls a deployment makes (nothing was written):", file=out)
        for call in calls:
            print(call.render(), file=out)
        print("(CreateEndpoint is UpdateEndpoint when the endpoint exists)", file=out)
        return 0
    apply(_client(args.region), calls, wait=args.wait, say=lambda line: print(line, file=out))
    print(f"endpoint {args.endpoint_name}: {req.instance_count} x {req.instance_type}", file=out)
    return 0


def _s3_ref(uri: str, what: str) -> tuple[ArtifactRef, S3Store]:
    ref = parse_ref(uri)
    if not ref.store.startswith("s3://"):
        raise DeployError(
            f"{what} {uri} is not in an S3 store; SageMaker reads models from S3: copy it there first "
            f"(python -m artifacts copy {uri} s3://BUCKET/PREFIX)"
        )
    return ref, S3Store(ref.store)


def _config(store: S3Store, manifest: Manifest) -> dict[str, Any]:
    entry = next((e for e in manifest.files if e.path == "config.json"), None)
    if entry is None:
        return {}
    return dict(json.loads(b"".join(store.read_blob(entry.sha256, entry.size))))


# ------------------------------------------------------------------------------------------------------- sizing


def size(manifest: Manifest, config: dict[str, Any], args: argparse.Namespace) -> Sized:
    """The need on each device kind the artifact runs on, the instance types that fit, and the one chosen."""
    table = fit.table()
    needs = {d: _need(manifest, config, d, args) for d in manifest.target.devices}
    ok = fit.fitting(table.instances, manifest.target, needs)
    chosen = _choose(args, table, manifest, needs, ok)
    return Sized(manifest, chosen, needs.get(chosen.device) or next(iter(needs.values())), needs, ok)


def _need(manifest: Manifest, config: dict[str, Any], device: str, args: argparse.Namespace) -> fit.Need:
    from runtime import engines
    from runtime.engines.base import EngineSettings

    target = manifest.target
    max_len = args.max_model_len or target.max_model_len
    with tempfile.TemporaryDirectory() as tmp:  # the engine's defaults hook reads config.json from a directory
        Path(tmp, "config.json").write_text(json.dumps(config))
        settings = EngineSettings(
            model_dir=Path(tmp),
            dtype=target.dtype,
            max_model_len=max_len,
            max_num_seqs=args.max_num_seqs or manifest.serving.get("max_num_seqs"),
            tensor_parallel_degree=target.tensor_parallel_degree,
            device=device,
            task=target.task,
        )
        chosen = engines.get(target.engine).defaults(settings) if target.engine in _engines() else {}
    settings = replace(settings, **{k: d.value for k, d in chosen.items()})
    need = fit.estimate(manifest, config, max_len, settings.max_num_seqs or 1)
    if settings.kv_cache_gib is not None:  # a fixed KV budget (vLLM on CPU) is what the engine allocates
        need = replace(need, kv=int(settings.kv_cache_gib * fit.GIB), kv_budget=True)
    return need


def _engines() -> set[str]:
    from runtime import engines

    return {s.name for s in engines.specs()}


def _choose(
    args: argparse.Namespace,
    table: fit.Table,
    manifest: Manifest,
    needs: dict[str, fit.Need],
    ok: list[fit.Instance],
) -> fit.Instance:
    if args.instance_type is None:
        if not ok:
            raise DeployError(_none_fit(table, manifest, needs))
        return ok[0]
    instance = table.get(args.instance_type)
    if instance is None:
        if not args.skip_fit_check:
            raise DeployError(
                f"--instance-type {args.instance_type} is not in kiln's instance table "
                "(runtime/deploy/instances.json), so it cannot be checked against the artifact; choose one that is, "
                "or pass --skip-fit-check"
            )
        device = manifest.target.devices[0]
        return fit.Instance(
            args.instance_type, 0.0, 0, 0.0, device, accelerators=manifest.target.tensor_parallel_degree
        )
    need = needs.get(instance.device) or next(iter(needs.values()))
    if (why := fit.problem(instance, manifest.target, need)) is not None:
        field, message = why
        hint = ", ".join(i.type for i in ok[:3]) or "none in kiln's table"
        raise DeployError(
            f"--instance-type {instance.type} does not fit this artifact: "
            f"{'target.' if field != 'memory' else ''}{field}: {message}; instance types that fit: {hint}"
        )
    return instance


def _none_fit(table: fit.Table, manifest: Manifest, needs: dict[str, fit.Need]) -> str:
    """Why not even the largest instance of each device kind fits."""
    reasons = []
    for device, need in needs.items():
        rows = [i for i in table.instances if i.device == device]
        if rows:
            largest = max(rows, key=lambda i: (i.devices * i.device_memory, -i.usd_per_hour))
            field, message = fit.problem(largest, manifest.target, need) or ("", "fits")
            reasons.append(f"the largest {device} instance, {largest.type}: {field}: {message}")
    return "no instance type in kiln's table fits this artifact (" + "; ".join(reasons) + ")"


def _report(ref: ArtifactRef, sized: Sized, out: TextIO) -> None:
    t, table = sized.manifest.target, fit.table()
    print(
        f"artifact: {ref} ({t.engine}, {'/'.join(t.devices)}, {t.dtype}, tensor_parallel_degree "
        f"{t.tensor_parallel_degree}, quantization {t.quantization})",
        file=out,
    )
    for device, need in sized.needs.items():
        print(f"needs on {device}: {need.summary()}", file=out)
    print(f"instance types that fit, cheapest first ({table.region} prices as of {table.read}, approximate):", file=out)
    for i in sized.fitting[:SHOWN]:
        print(f"  {i.type:<18} ${i.usd_per_hour:>7.3f}/h  {i.describe()}", file=out)
    if len(sized.fitting) > SHOWN:
        print(f"  … and {len(sized.fitting) - SHOWN} more", file=out)
    print(f"  (source: runtime/deploy/instances.json — {table.source[:80]}…)", file=out)
    print(f"instance type: {sized.instance.type}", file=out)


def _report_tree(tree: StagedTree, dry_run: bool, out: TextIO) -> None:
    if tree.copied:
        state = f"staged now ({tree.copied} objects, {tree.bytes / 1e6:.1f} MB copied inside S3)"
    else:
        state = "to be staged" if dry_run else "staged already"
    print(f"model data: {tree.uri} ({state})", file=out)


# ---------------------------------------------------------------------------------------------------- adapters


def _adapter(uri: str, base: Manifest, dry_run: bool) -> Adapter:
    ref, store = _s3_ref(uri, "the adapter")
    ref, manifest = load_manifest(ref, store)
    if manifest.adapter is None:
        raise DeployError(f"--adapter {uri} is a model, not a LoRA adapter artifact")
    base_digest = dict(manifest.adapter["base"]).get("digest")
    if base_digest != base.digest:
        raise DeployError(
            f"--adapter {uri} was built for base {base_digest}, not for {base.name}@{base.digest}; "
            "rebuild it against this model"
        )
    return Adapter(manifest.name, stage_tarball(store, manifest, dry_run=dry_run), int(manifest.adapter["rank"]))


def _request(args: argparse.Namespace, sized: Sized, tree: StagedTree, adapters: tuple[Adapter, ...]) -> Request:
    env = dict(_pairs(args.env))
    if args.max_model_len:  # the container serves with the limits the deployment was sized for
        env.setdefault("OPTION_MAX_MODEL_LEN", str(args.max_model_len))
    if args.max_num_seqs:
        env.setdefault("OPTION_MAX_NUM_SEQS", str(args.max_num_seqs))
    return Request(
        endpoint=args.endpoint_name,
        image=args.image,
        role=args.role,
        instance_type=sized.instance.type,
        instance_count=args.instance_count,
        model_data=tree.uri,
        device=sized.instance.device,
        devices=sized.manifest.target.tensor_parallel_degree,
        memory_mb=fit.memory_mb(sized.need, sized.instance.device),
        startup_timeout_s=args.startup_timeout,
        env=env,
        inference_components=args.inference_components or bool(adapters),
        adapters=adapters,
    )


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"--env {key or item!r}: expected KEY=VALUE")  # no '=': no value to leak
        pairs.append((key, value))
    return pairs


def _client(region: str | None) -> Any:
    import boto3

    return boto3.client("sagemaker", region_name=region)
