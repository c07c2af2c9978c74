"""The `facemux` command line.

Client commands (swap, encode, decode, identities, info, health) need only the client
install; `serve` and `demo` need the server extra (torch) and import it lazily.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from facemux.client import progress
from facemux.client.client import REQUEST_ID_HEADER, FacemuxClient, Latent
from facemux.client.errors import FacemuxRpcError
from facemux.v1 import provenance_service_pb2 as ppb
from facemux.v1 import training_service_pb2 as tpb
from google.protobuf.json_format import MessageToDict

DEFAULT_TARGET = "127.0.0.1:50051"


def _client(args: argparse.Namespace) -> FacemuxClient:
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return FacemuxClient(
        args.target,
        timeout=args.timeout,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        token=token,
        server_name=args.server_name,
        metadata=[(REQUEST_ID_HEADER, args.request_id)] if args.request_id else (),
    )


def cmd_tokens(args: argparse.Namespace) -> int:
    """Print a callers-file entry (hash only) on stdout; a new token goes to stderr once."""
    from facemux.service.auth import make_entry

    given = sys.stdin.readline().strip() if args.token_stdin else None
    entry, token = make_entry(args.name, args.roles.split(","), given, args.scheme, args.expires)
    print(json.dumps(entry))
    if given is None:
        print(f"token for {args.name} (shown once, store it safely): {token}", file=sys.stderr)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Check an audit log's hash chain: 0 when unbroken, 1 at the first broken line."""
    from facemux.client.audit_chain import rotated_files, verify

    path = Path(args.file)
    if not path.exists():
        raise OSError(f"{path}: no such file")
    files = [path] if args.only else rotated_files(path)
    report = verify(files)
    print(report)
    return 0 if report.ok else 1


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _outputs(inputs: Sequence[str], out: str | None, suffix: str, ext: str) -> list[Path]:
    """One output path per input: OUT itself for a single input, else OUT as a directory."""
    if out and len(inputs) == 1 and Path(out).suffix:
        return [Path(out)]
    folder = Path(out or ".")
    folder.mkdir(parents=True, exist_ok=True)
    return [folder / f"{Path(p).stem}{suffix}.{ext}" for p in inputs]


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    import asyncio
    import logging

    from facemux.models.errors import FacemuxError
    from facemux.service.settings import parse_settings

    try:
        settings = parse_settings(rest)
    except FacemuxError as exc:
        print(f"facemux serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.processes > 1:
        from facemux.service.processes import run_processes

        return run_processes(settings)
    from facemux.service.server import serve

    try:
        asyncio.run(serve(settings))
    except FacemuxError as exc:  # a setting this machine cannot honour: say which, no trace
        print(f"facemux serve: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from facemux.service.demo import main as demo_main

    return demo_main(rest)


def cmd_export(args: argparse.Namespace) -> int:
    """Local: reads the store directory, needs the server extra (and export or torchserve)."""
    from facemux.models.errors import FacemuxError
    from facemux.service.store import LocalStore

    if not Path(args.store).is_dir():
        print(f"error: no store at {args.store}", file=sys.stderr)
        return 2
    store = LocalStore(Path(args.store))
    parts = 1 + len(args.identities) + (1 if args.format == "torchserve" or args.triton else 0)
    bar = progress.bar(parts, desc=f"export {args.format}", unit="part", quiet=args.quiet)

    def step(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update()

    try:
        if args.format == "torchserve":
            from facemux.service.export_torchserve import export_torchserve

            mar = export_torchserve(
                store,
                args.identities,
                Path(args.out),
                model_name=args.model_name,
                encoder=args.encoder,
                batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay,
                workers=args.workers,
                c2pa_cert=Path(args.c2pa_cert) if args.c2pa_cert else None,
                c2pa_key=Path(args.c2pa_key) if args.c2pa_key else None,
                on_step=step,
            )
            bar.close()
            if args.json:
                _print_json(mar.to_dict())
            else:
                who = ", ".join(f"{n} v{v}" for n, v in mar.identities.items())
                print(f"{mar.mar} ({mar.size_bytes / 1e6:.1f} MB): {who}")
            return 0
        from facemux.service.export import export_onnx

        report = export_onnx(
            store,
            args.identities,
            Path(args.out),
            encoder=args.encoder,
            triton=args.triton,
            check_parity=not args.no_parity,
            max_batch=args.max_batch,
            on_step=step,
        )
    except FacemuxError as exc:
        bar.close()
        print(f"facemux export: {exc}", file=sys.stderr)
        return 2
    bar.close()
    if args.json:
        _print_json(report.to_dict())
        return 0
    print(f"encoder {report.encoder_fingerprint[:12]} ({report.preset}, {report.resolution} px)")
    for d in report.decoders:
        parity = "" if d.parity_max_abs_error is None else f", parity {d.parity_max_abs_error:.1e}"
        print(f"  {d.identity} v{d.version} -> {d.file}{parity}")
    if report.triton_repository:
        print(f"Triton model repository: {Path(args.out) / report.triton_repository}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_json(MessageToDict(c.model_info()))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_swap(args: argparse.Namespace) -> int:
    ext = args.format or Path(args.images[0]).suffix.lstrip(".").lower() or "png"
    outs = _outputs(args.images, args.output, "_swapped", ext)
    with _client(args) as c:
        if args.aligned:
            res = c.swap_faces(args.images, args.identity, args.version, output_format=args.format)
            for path, face in zip(outs, res.faces, strict=True):
                path.write_bytes(face)
            done = res.faces_swapped
        else:
            done = 0
            for src, path in zip(args.images, outs, strict=True):
                r = c.swap_image(src, args.identity, args.version, output_format=args.format)
                assert r.frame is not None
                path.write_bytes(r.frame)
                done += r.faces_swapped
    for path in outs:
        print(path)
    print(f"{done} face(s) swapped to {args.identity}", file=sys.stderr)
    return 0


def cmd_swap_video(args: argparse.Namespace) -> int:
    from facemux.client.video import swap_video

    with _client(args) as c:
        summary = swap_video(
            c,
            args.input,
            args.output,
            args.identity,
            args.version,
            detect_every=args.detect_every,
            quality=args.quality,
            show_progress=not args.quiet,
        )
    print(
        f"{args.output}: {summary.frames} frames at {summary.fps:.2f} fps, "
        f"{summary.faces_swapped} faces swapped, {summary.frame_errors} frame errors, "
        f"{summary.frames / max(summary.seconds, 1e-9):.1f} frames/s; audio {summary.audio}"
    )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    with _client(args) as c:
        latents = c.encode(args.images, dtype=args.dtype)
    arr = np.stack([lat.array for lat in latents])
    np.savez(args.output, latents=arr, encoder_fingerprint=latents[0].encoder_fingerprint)
    print(f"{len(latents)} latent(s) of shape {list(arr.shape[1:])} -> {args.output}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    with np.load(args.latents) as f:
        arr, fp = f["latents"], str(f["encoder_fingerprint"])
    with _client(args) as c:
        res = c.decode([Latent(a, fp) for a in arr], args.identity, args.version)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(res.faces):
        (out / f"decoded_{i:04d}.png").write_bytes(face)
    print(f"{len(res.faces)} face(s) of {args.identity} v{res.identity_version} -> {out}")
    return 0


def cmd_identities(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            for ident in c.list_identities():
                versions = ",".join(str(v.version) for v in ident.versions)
                print(f"{ident.name}\tdefault v{ident.default_version}\tversions {versions}")
        elif args.action == "get":
            _print_json(MessageToDict(c.get_identity(args.name)))
        elif args.action == "register":
            consent = _consent_arg(args.consent)
            r = c.register_identity(
                args.name,
                args.checkpoint,
                display_name=args.display_name,
                make_default=not args.no_default,
                consent=consent,
            )
            print(f"registered {r.identity.name} v{r.version}")
        elif args.action == "delete":
            d = c.delete_identity(args.name, args.version)
            what = "identity" if d.identity_deleted else "version(s)"
            print(f"deleted {what} {args.name} {list(d.deleted_versions)}")
        elif args.action == "set-default":
            ident = c.set_default_version(args.name, args.version)
            print(f"{ident.name} default is now v{ident.default_version}")
        elif args.action == "revoke":
            ident = c.revoke_consent(args.name, args.reason)
            print(f"consent of {ident.name} revoked at {ident.consent.revoked_at.ToJsonString()}")
        elif args.action == "consent":
            record = _consent_arg(args.consent)
            if record is None:
                raise ValueError(f"--consent is required, e.g. {_CONSENT_EXAMPLE}")
            ident = c.record_consent(args.name, record)
            print(
                f"consent of {ident.name} recorded: attested by {ident.consent.attested_by}, "
                f"granted {ident.consent.granted_at.ToJsonString()} "
                f"({len(ident.consent_history)} earlier)"
            )
    return 0


def _verify_local(data: bytes, anchors: str | None, request_id: str) -> ppb.VerifyResponse:
    # Same code as the server's Verify; needs the server extra (opencv, c2pa-python).
    from facemux.service.provenance import verify_bytes

    pem = Path(anchors).read_bytes() if anchors else None
    return verify_bytes(data, trust_anchors_pem=pem, check_request_id=request_id)


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the image carries a facemux mark (valid manifest or watermark), else 1."""
    from facemux.client.errors import DeadlineExceeded, Unavailable, Unimplemented

    data = Path(args.image).read_bytes()
    where = "local"
    if args.local or args.trust_anchors:
        r = _verify_local(data, args.trust_anchors, args.check_request_id)
    else:
        try:
            with _client(args) as c:
                r = c.verify(data, args.check_request_id)
            where = args.target
        except (Unavailable, DeadlineExceeded, Unimplemented) as exc:
            # No server reachable (or an older one): the check needs no model, so do it here.
            why = type(exc).__name__
            print(f"no answer from {args.target} ({why}); verifying locally", file=sys.stderr)
            r = _verify_local(data, None, args.check_request_id)
    if args.json:
        _print_json(MessageToDict(r, always_print_fields_with_no_presence=True))
    else:
        print(f"file:      {args.image} (checked {where})")
        manifest = r.manifest_summary
        if r.manifest_present and r.manifest_valid:
            manifest += (
                f"; generator {r.generator or '?'}, source type "
                f"{r.digital_source_type or '?'}, request {r.request_id or '?'}"
            )
        print(f"manifest:  {manifest}")
        wm = "found" if r.watermark_found else "not found"
        if r.watermark_found:
            wm += f", payload {r.watermark_payload or 'unreadable'}"
        print(f"watermark: {wm} (confidence {r.watermark_confidence:.1f})")
        if r.checked_request_id:
            says = "carry" if r.watermark_matches_request else "do not carry"
            print(f"request:   the pixels {says} the mark of request {r.checked_request_id}")
    return 0 if (r.manifest_valid or r.watermark_found) else 1


def _job_line(j: tpb.Job) -> str:
    state = tpb.JobState.Name(j.state).removeprefix("JOB_STATE_").lower()
    mode = tpb.TrainMode.Name(j.mode).removeprefix("TRAIN_MODE_").lower()
    what = j.identity or ",".join(j.datasets)
    line = f"{j.id}\t{state}\t{mode}\t{what}\tstep {j.step}/{j.steps}"
    if j.result_version:
        line += f"\tv{j.result_version}"
    return line + (f"\t{j.error}" if j.error else "")


def _counted(items: Sequence[str], bar: Any) -> Iterator[str]:
    for item in items:
        yield item
        bar.update()  # asked for the next one: this one is on its way


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            for d in c.list_datasets():
                print(f"{d.name}\t{d.faces} faces\t{d.resolution}px\t{d.content_hash[:16]}")
        elif args.action == "upload":
            # Advances as each image is read into the upload stream (one message per image).
            with progress.bar(
                len(args.images), desc=f"upload {args.name}", unit="img", quiet=args.quiet
            ) as bar:
                r = c.upload_dataset(args.name, _counted(args.images, bar), aligned=args.aligned)
            for rej in r.rejected:
                print(f"rejected {args.images[rej.index]}: {rej.reason}", file=sys.stderr)
            print(
                f"{r.dataset.name}: {r.accepted} added, {r.duplicates} duplicate(s), "
                f"{len(r.rejected)} rejected; {r.dataset.faces} faces"
            )
        elif args.action == "delete":
            c.delete_dataset(args.name)
            print(f"deleted dataset {args.name}")
    return 0


def _watch(c: FacemuxClient, job_id: str, replay: bool = False, quiet: bool = False) -> int:
    """On a terminal: a bar of steps with the loss and the time left, notes (checkpoints,
    the final state) above it. Else (or --quiet): only the notes, a line each."""
    last = None
    with progress.bar(desc=f"job {job_id}", unit="step", quiet=quiet) as bar:
        for ev in c.watch_job(job_id, replay=replay):
            last = ev.job
            if ev.job.steps and bar.total != ev.job.steps:
                bar.total = ev.job.steps
            if ev.job.step > bar.n:
                bar.update(ev.job.step - bar.n)
            if ev.losses:
                shown = {"loss": f"{ev.losses.get('total', min(ev.losses.values())):.4f}"}
                if ev.examples_per_second:
                    shown["faces/s"] = f"{ev.examples_per_second:.0f}"
                if ev.eta_seconds:
                    shown["eta"] = f"{ev.eta_seconds:.0f}s"
                bar.set_postfix(shown)
            if ev.message:
                (bar.write if not bar.disable else print)(
                    f"step {ev.job.step}/{ev.job.steps}  {ev.message}"
                )
    return 0 if last is not None and last.state == tpb.JOB_STATE_SUCCEEDED else 1


def cmd_train(args: argparse.Namespace) -> int:
    consent = _consent_arg(args.consent)
    with _client(args) as c:
        job = c.train(
            args.datasets,
            identity=args.identity,
            mode=args.mode,
            preset=args.preset,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            encoder_learning_rate=args.encoder_lr,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            consent=consent,
        )
        print(_job_line(job))
        return _watch(c, job.id, quiet=args.quiet) if args.watch else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            for j in c.list_jobs():
                print(_job_line(j))
        elif args.action == "get":
            _print_json(MessageToDict(c.get_job(args.id)))
        elif args.action == "watch":
            return _watch(c, args.id, args.replay, args.quiet)
        elif args.action == "cancel":
            print(_job_line(c.cancel_job(args.id)))
    return 0


def _consent_arg(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"--consent is not valid JSON ({exc}); e.g. {_CONSENT_EXAMPLE}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--consent must be a JSON object, e.g. {_CONSENT_EXAMPLE}")
    return value


_CONSENT_EXAMPLE = '\'{"attested_by": "ops@example.com", "evidence_ref": "TICKET-1"}\''


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facemux", description="facemux face-swap server and client")
    # Connection flags go on every client command, so they may follow the command name.
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
    conn.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    conn.add_argument("--ca", help="CA certificate (PEM) to verify the server: turns TLS on")
    conn.add_argument("--cert", help="client certificate (PEM) for mTLS")
    conn.add_argument("--key", help="client private key (PEM) for mTLS")
    conn.add_argument("--server-name", help="name to check in the server certificate")
    creds = conn.add_mutually_exclusive_group()
    creds.add_argument("--token", help="bearer token (prefer --token-file: argv is visible)")
    creds.add_argument("--token-file", help="file holding the bearer token")
    conn.add_argument(
        "--request-id",
        default="",
        help="request id sent with every call of the command (metadata x-request-id); the "
        "server makes one when it is not given",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def client_cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[conn], help=help)

    sub.add_parser("serve", help="run the server (flags: facemux serve --help)", add_help=False)
    sub.add_parser(
        "demo", help="train a tiny model on synthetic faces, serve it, swap", add_help=False
    )
    ex = sub.add_parser("export", help="export identities for other runtimes (local store)")
    exsub = ex.add_subparsers(dest="format", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("identities", nargs="+", help="identity names, or name:version")
    common.add_argument("--store", default="facemux-store", help="the server's store directory")
    common.add_argument("-o", "--out", default="facemux-export", help="output directory")
    common.add_argument("--encoder", default="", help="encoder fingerprint; default = the store's")
    common.add_argument("--json", action="store_true", help="print the export report as JSON")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    eo = exsub.add_parser(
        "onnx",
        parents=[common],
        help="encoder.onnx + one decoder per identity (optionally a Triton repository)",
    )
    eo.add_argument("--triton", action="store_true", help="also write a Triton model repository")
    eo.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size")
    eo.add_argument("--no-parity", action="store_true", help="skip the onnxruntime parity check")
    et = exsub.add_parser(
        "torchserve", parents=[common], help="one TorchServe archive (.mar) with facemux's handler"
    )
    et.add_argument("--model-name", default="facemux", help="TorchServe model name")
    et.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize")
    et.add_argument("--max-batch-delay", type=int, default=10, help="maxBatchDelay, ms")
    et.add_argument("--workers", type=int, default=1, help="TorchServe workers")
    et.add_argument("--c2pa-cert", help="certificate chain (PEM) to sign outputs with C2PA")
    et.add_argument("--c2pa-key", help="its private key (PEM): it travels inside the archive")
    client_cmd("info", help="describe the served model")
    h = client_cmd("health", help="print the server's health status")
    h.add_argument("--service", default="", help="service name; empty = whole server")

    s = client_cmd("swap", help="swap faces in images to an identity")
    s.add_argument("images", nargs="+", help="image files")
    s.add_argument("--identity", required=True)
    s.add_argument("--version", type=int, default=0, help="identity version; 0 = default")
    s.add_argument("--aligned", action="store_true", help="inputs are aligned face crops")
    s.add_argument("--format", choices=["png", "jpeg", "webp"], help="output format")
    s.add_argument("-o", "--output", help="output file (one input) or directory")

    v = client_cmd("swap-video", help="swap faces in a video file through SwapStream")
    v.add_argument("input", help="any video OpenCV can read")
    v.add_argument("output", help="output video (.mp4)")
    v.add_argument("--identity", required=True)
    v.add_argument("--version", type=int, default=0)
    v.add_argument(
        "--detect-every",
        type=int,
        default=0,
        help="run the detector every N frames (0 = server default)",
    )
    v.add_argument("--quality", type=int, default=95, help="JPEG quality of frames in transit")
    v.add_argument("--quiet", action="store_true", help="no progress bar")

    e = client_cmd("encode", help="encode aligned crops into latents (.npz)")
    e.add_argument("images", nargs="+")
    e.add_argument("-o", "--output", default="latents.npz")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32")

    d = client_cmd("decode", help="decode latents (.npz from encode) with an identity")
    d.add_argument("latents")
    d.add_argument("--identity", required=True)
    d.add_argument("--version", type=int, default=0)
    d.add_argument("-o", "--output", default="decoded")

    i = sub.add_parser("identities", help="manage identities")
    isub = i.add_subparsers(dest="action", required=True)
    isub.add_parser("list", parents=[conn])
    g = isub.add_parser("get", parents=[conn])
    g.add_argument("name")
    r = isub.add_parser(
        "register", parents=[conn], help="upload a decoder checkpoint (.safetensors)"
    )
    r.add_argument("name")
    r.add_argument("checkpoint")
    r.add_argument("--display-name", default="")
    r.add_argument("--no-default", action="store_true", help="do not make it the default")
    r.add_argument("--consent", help="consent record as JSON (attested_by, evidence_ref, ...)")
    dl = isub.add_parser("delete", parents=[conn])
    dl.add_argument("name")
    dl.add_argument("--version", type=int, default=0, help="0 = the whole identity")
    sd = isub.add_parser("set-default", parents=[conn])
    sd.add_argument("name")
    sd.add_argument("version", type=int)
    rv = isub.add_parser("revoke", parents=[conn], help="revoke an identity's consent")
    rv.add_argument("name")
    rv.add_argument("--reason", default="")
    rc = isub.add_parser(
        "consent",
        parents=[conn],
        help="record new consent for an identity (replaces the one in force, lifts a revocation)",
    )
    rc.add_argument("name")
    rc.add_argument(
        "--consent", required=True, help="the new record as JSON (attested_by, evidence_ref, ...)"
    )

    vf = client_cmd(
        "verify", help="check an image's provenance: C2PA manifest and facemux watermark"
    )
    vf.add_argument("image", help="PNG, JPEG or WebP file")
    vf.add_argument(
        "--local",
        action="store_true",
        help="check here, without a server (needs the server extra); also used when no "
        "server answers",
    )
    vf.add_argument(
        "--made-by",
        dest="check_request_id",
        metavar="REQUEST_ID",
        default="",
        help="test the watermark against this request id (default: the manifest's): did that "
        "request make the image? Works on images too small or degraded to read the payload",
    )
    vf.add_argument(
        "--trust-anchors",
        help="CA certificates (PEM) to trust as manifest signers; implies --local",
    )
    vf.add_argument("--json", action="store_true", help="print the full report as JSON")

    t = sub.add_parser("tokens", help="manage server callers (auth_tokens_file entries)")
    tsub = t.add_subparsers(dest="action", required=True)
    th = tsub.add_parser("hash", help="make a callers-file entry: a new token and its hash")
    th.add_argument("name", help="caller name (letters, digits, _ and -)")
    th.add_argument("--roles", required=True, help="comma-separated: swap, train, admin")
    th.add_argument("--scheme", choices=["scrypt", "sha256"], default="scrypt")
    th.add_argument(
        "--token-stdin", action="store_true", help="hash a token read from stdin (NAME.secret)"
    )
    th.add_argument(
        "--expires",
        default="",
        help="the token stops working at this ISO-8601 time (e.g. 2027-01-31T00:00:00Z)",
    )

    au = sub.add_parser("audit", help="check the server's audit log")
    asub = au.add_subparsers(dest="action", required=True)
    av = asub.add_parser(
        "verify",
        help="check the hash chain of FILE and its rotated files (FILE.1, FILE.2, ...)",
    )
    av.add_argument("file", help="the audit log (setting audit_log)")
    av.add_argument("--only", action="store_true", help="check FILE alone, not its rotated files")

    ds = sub.add_parser("datasets", help="manage training datasets")
    dsub = ds.add_subparsers(dest="action", required=True)
    dsub.add_parser("list", parents=[conn])
    du = dsub.add_parser("upload", parents=[conn], help="add photos or aligned crops")
    du.add_argument("name")
    du.add_argument("images", nargs="+")
    du.add_argument("--aligned", action="store_true", help="images are aligned face crops")
    du.add_argument("--quiet", action="store_true", help="no progress bar")
    dd = dsub.add_parser("delete", parents=[conn])
    dd.add_argument("name")

    tr = client_cmd("train", help="start a training job (and watch it with --watch)")
    tr.add_argument("datasets", nargs="+", help="identity mode: one; pretrain: one per identity")
    tr.add_argument("--identity", default="", help="identity mode: the identity to train")
    tr.add_argument("--mode", choices=["identity", "pretrain"], default="identity")
    tr.add_argument("--preset", default="", help="pretrain: model preset")
    tr.add_argument("--steps", type=int, default=0, help="0 = server default")
    tr.add_argument("--batch-size", type=int, default=0)
    tr.add_argument(
        "--lr", type=float, default=0.0, help="peak learning rate; 0 = server default (1e-3)"
    )
    tr.add_argument("--encoder-lr", type=float, default=0.0, help="identity mode; 0 = frozen")
    tr.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints; 0 = server default (100, at most one per 10 s)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--consent", help="consent record as JSON (attested_by, evidence_ref, ...)")
    tr.add_argument("--watch", action="store_true", help="stream progress until it ends")
    tr.add_argument("--quiet", action="store_true", help="with --watch: no progress bar")

    jb = sub.add_parser("jobs", help="list, watch and cancel training jobs")
    jsub = jb.add_subparsers(dest="action", required=True)
    jsub.add_parser("list", parents=[conn])
    for action in ("get", "watch", "cancel"):
        jp = jsub.add_parser(action, parents=[conn])
        jp.add_argument("id")
        if action == "watch":
            jp.add_argument("--replay", action="store_true", help="print every past event first")
            jp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


COMMANDS = {
    "info": cmd_info,
    "health": cmd_health,
    "swap": cmd_swap,
    "swap-video": cmd_swap_video,
    "encode": cmd_encode,
    "decode": cmd_decode,
    "identities": cmd_identities,
    "datasets": cmd_datasets,
    "train": cmd_train,
    "jobs": cmd_jobs,
    "tokens": cmd_tokens,
    "audit": cmd_audit,
    "verify": cmd_verify,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # What is alive now stays alive until exit. Frozen, it is skipped by the collections
        # the interpreter runs as it exits: after a command that loaded torch (serve, export,
        # demo) those took about a second here.
        gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        # serve and demo own their flags (and --help) after the command name.
        if args.command == "serve":
            return cmd_serve(args, rest)
        if args.command == "demo":
            return cmd_demo(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return COMMANDS[args.command](args)
    except FacemuxRpcError as exc:
        rid = f" (request id {exc.request_id})" if exc.request_id else ""
        print(f"error: {exc}{rid}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
