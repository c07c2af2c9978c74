"""The `facemux` command line.

Client commands (swap, encode, decode, identities, info, health) need only the client
install; `serve` and `demo` need the server extra (torch) and import it lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from facemux.client.client import FacemuxClient, Latent
from facemux.client.errors import FacemuxRpcError
from google.protobuf.json_format import MessageToDict

DEFAULT_TARGET = "127.0.0.1:50051"


def _client(args: argparse.Namespace) -> FacemuxClient:
    return FacemuxClient(args.target, timeout=args.timeout)


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

    from facemux.service.server import serve
    from facemux.service.settings import parse_settings

    settings = parse_settings(rest)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(settings))
    return 0


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from facemux.service.demo import main as demo_main

    return demo_main(rest)


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
            consent = json.loads(args.consent) if args.consent else None
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
            print(f"consent of {ident.name} revoked at {ident.consent.revoked_at}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facemux", description="facemux face-swap server and client")
    # Connection flags go on every client command, so they may follow the command name.
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
    conn.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    sub = p.add_subparsers(dest="command", required=True)

    def client_cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[conn], help=help)

    sub.add_parser("serve", help="run the server (flags: facemux serve --help)", add_help=False)
    sub.add_parser(
        "demo", help="train a tiny model on synthetic faces, serve it, swap", add_help=False
    )
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
    return p


COMMANDS = {
    "info": cmd_info,
    "health": cmd_health,
    "swap": cmd_swap,
    "swap-video": cmd_swap_video,
    "encode": cmd_encode,
    "decode": cmd_decode,
    "identities": cmd_identities,
}


def main(argv: Sequence[str] | None = None) -> int:
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
