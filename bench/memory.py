"""Resident bytes per registered identity on the device: decoder weights held by the LRU,
and the process's resident-set growth per decoder loaded (CPU) or CUDA memory (GPU).

    python bench/memory.py --preset original64 --identities 6
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import numpy as np
import torch
from facemux.models import checkpoint
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.runtime import Runtime
from facemux.service.settings import Settings
from facemux.service.store import LocalStore, VersionRecord

# Synthetic decoders of no one; the store gives every identity a consent record.
BENCH_CONSENT = {"attested_by": "bench", "evidence_ref": "synthetic", "granted_at": "2026-01-01"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="original64")
    p.add_argument("--identities", type=int, default=6)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    cfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        enc_bytes, meta = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=0), cfg)
        store.put_encoder(enc_bytes, meta.fingerprint)
        names = [f"id{i}" for i in range(args.identities)]
        for i, name in enumerate(names):
            data, dmeta = checkpoint.decoder_to_bytes(
                build_decoder(cfg, seed=i), cfg, meta.fingerprint, name
            )
            store.add_version(
                name,
                data,
                VersionRecord.for_decoder(dmeta),
                consent=BENCH_CONSENT,
            )
        rt = Runtime(
            Settings(store=Path(tmp), device=args.device, decoder_cache_count=args.identities),
            store,
        )
        rt.load()
        faces = np.zeros((1, cfg.resolution, cfg.resolution, 3), np.uint8)
        cuda = rt.device.type == "cuda"
        before = torch.cuda.memory_allocated(rt.device) if cuda else rss_bytes()
        for name in names:
            rt.decode_batch(rt.decoder(name).decoder, rt.encode_batch(faces))
        after = torch.cuda.memory_allocated(rt.device) if cuda else rss_bytes()
        weights = rt.cache.total_bytes() / len(names)
        growth = (after - before) / len(names)
    what = "CUDA memory allocated" if cuda else "process RSS growth"
    print(f"preset {args.preset} on {rt.device}, {args.identities} identities resident")
    print(f"{'decoder weights per identity':34s} {weights / 2**20:9.2f} MiB")
    print(f"{what + ' per identity':34s} {growth / 2**20:9.2f} MiB")
    print(f"summary: {weights / 2**20:.1f} MiB of weights per resident identity ({args.preset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
