"""CUDA paths (run by bench/gpu.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from common import Models, face_image, make_store
from facemux.client import FacemuxClient
from facemux.models import imageio
from facemux.models.errors import InvalidInputError
from facemux.models.faces import gpu_codec
from facemux.models.faces.tensor import from_uint8, paste_face_t, to_uint8, warp_crop_t
from facemux.service.runtime import Runtime
from facemux.service.scheduler import Item, Op, Scheduler
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from skimage import data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_bf16_runtime_on_cuda_matches_fp32_cpu(tmp_path: Path, models: Models) -> None:
    store = make_store(tmp_path / "s", models, ("alice",))
    cpu = Runtime(Settings(store=store.root, device="cpu"), store)
    gpu = Runtime(Settings(store=store.root, device="cuda", warmup_batch_sizes="1,8"), store)
    cpu.load()
    gpu.load()
    assert gpu.use_bf16 and not cpu.use_bf16
    faces = np.stack([face_image(i) for i in range(8)])
    outs = []
    for rt in (cpu, gpu):
        s = Scheduler(rt)
        try:
            item = Item(Op.SWAP, faces, rt.decoder("alice").decoder, None)
            res = s.submit(item).result(timeout=60)
        finally:
            s.stop()
        assert res.faces is not None
        outs.append(res.faces.astype(int))
    # bf16 keeps ~3 significant digits: a few grey levels on random-weight models.
    assert np.abs(outs[0] - outs[1]).mean() < 4


def test_compiled_runtime_runs_every_batch_size_in_its_buckets(
    tmp_path: Path, models: Models
) -> None:
    """--compile reduce-overhead (CUDA graphs) with max batch 4: batches of 1 to 9 faces
    run at 1, 2 or 4 rows only (3 padded to 4; 9 as 4, 4 and 1, whose rows must survive the
    graph's next replay), and so do Decode's latents from the host; none is left
    uncompiled, and the faces agree with the uncompiled runtime's."""
    from torch._dynamo.utils import counters

    store = make_store(tmp_path / "s", models, ("alice",))
    plain = Runtime(Settings(store=store.root, device="cuda", max_batch_size=4), store)
    compiled = Runtime(
        Settings(store=store.root, device="cuda", max_batch_size=4, compile="reduce-overhead"),
        store,
    )
    assert compiled.buckets == (1, 2, 4) and plain.buckets == ()
    torch._dynamo.reset()
    counters.clear()
    try:
        outs: dict[str, list[np.ndarray]] = {}
        for name, rt in (("plain", plain), ("compiled", compiled)):
            rt.load()
            s = Scheduler(rt)
            try:
                outs[name] = []
                decoder = rt.decoder("alice").decoder
                for n in (1, 3, 4, 2, 9):
                    faces = np.stack([face_image(i) for i in range(n)])
                    res = s.submit(Item(Op.SWAP, faces, decoder, None)).result(timeout=300)
                    assert res.faces is not None and len(res.faces) == n
                    outs[name].append(res.faces.astype(int))
                faces = np.stack([face_image(i) for i in range(3)])
                enc = s.submit(Item(Op.ENCODE, faces, None, None)).result(timeout=300)
                assert enc.latents is not None
                dec = s.submit(Item(Op.DECODE, enc.latents, decoder, None)).result(timeout=300)
                assert dec.faces is not None and len(dec.faces) == 3
                outs[name].append(dec.faces.astype(int))
            finally:
                s.stop()
        # 3 -> 4 through the encoder and the decoder; Encode and Decode of 3, one each.
        assert compiled.padded_faces == 4
        assert not any("recompile" in k.lower() for k in counters["unimplemented"])
        for a, b in zip(outs["plain"], outs["compiled"], strict=True):
            assert np.abs(a - b).mean() < 2  # bf16 both; fused kernels round differently
    finally:
        torch._dynamo.reset()


def test_tensor_pixel_path_same_on_cuda_and_cpu() -> None:
    photo = data.astronaut()
    m = np.array([[0.7, 0.0, -120.0], [0.0, 0.7, -50.0]])
    crops = [to_uint8(warp_crop_t(from_uint8(photo, d), m, 64)) for d in ("cpu", "cuda")]
    assert np.abs(crops[0].astype(int) - crops[1].astype(int)).max() <= 1
    face = from_uint8(crops[0])
    mask = torch.ones(1, 64, 64)
    frames = [
        to_uint8(paste_face_t(from_uint8(photo, d), face.to(d), mask.to(d), m))
        for d in ("cpu", "cuda")
    ]
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).max() <= 1


needs_nvjpeg = pytest.mark.skipif(
    not gpu_codec.available("cuda"), reason="needs torchvision's nvjpeg ops"
)


@needs_nvjpeg
def test_nvjpeg_decode_and_encode_agree_with_opencv() -> None:
    photo = data.astronaut()
    jpeg = imageio.encode_image(photo, "JPEG", 95)
    host = imageio.decode_image(jpeg, 10_000_000).rgb
    codec = gpu_codec.JpegCodec("cuda")
    dev = codec.decode(jpeg, 10_000_000)
    assert dev.is_cuda and dev.dtype == torch.uint8 and tuple(dev.shape) == (3, 512, 512)
    diff = np.abs(dev.permute(1, 2, 0).cpu().numpy().astype(int) - host.astype(int))
    assert diff.mean() < 1.0  # IDCT and upsampling differ by a grey level here and there
    back = imageio.decode_image(codec.encode(dev, 95), 10_000_000).rgb
    assert np.abs(back.astype(int) - host.astype(int)).mean() < 2.0
    with pytest.raises(InvalidInputError, match="truncated"):
        codec.decode(jpeg[: len(jpeg) // 2], 10_000_000)
    with pytest.raises(InvalidInputError):
        codec.decode(jpeg, 1000)  # over the pixel limit, refused before decoding


@needs_nvjpeg
def test_full_frame_swap_with_nvjpeg_matches_the_host_codec(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    jpeg = imageio.encode_image(data.astronaut(), "JPEG", 95)
    frames = []
    for mode in ("on", "off"):
        settings = Settings(
            port=0, auth="off", store=tmp_path / "store", device="cuda", gpu_jpeg=mode
        )
        with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as client:
            client.wait_ready(60)
            res = client.swap_image(jpeg, "alice")
            assert res.faces_swapped == 1
            assert res.frame is not None and imageio.sniff_format(res.frame) == "JPEG"
            frames.append(imageio.decode_image(res.frame, 10_000_000).rgb.astype(int))
            report = client.verify(res.frame)
            assert report.watermark_found
            assert srv.app is not None
            codec = "nvjpeg" if mode == "on" else "host"
            for op in ("decode", "encode"):
                n = srv.app.metrics.registry.get_sample_value(
                    "facemux_frame_codec_frames_total", {"op": op, "codec": codec}
                )
                assert n == 1, (op, codec, n)
    # Two codecs apart at each end: nvjpeg decodes the input about a grey level off OpenCV,
    # and encodes 4:4:4 chroma where OpenCV encodes 4:2:0 (1.3 levels on this image at q95
    # from the subsampling alone). A swapped channel order or a lost face would be 20+.
    assert np.abs(frames[0] - frames[1]).mean() < 3.0


def test_real_cuda_out_of_memory_lowers_the_batch_and_the_job_finishes(tmp_path: Path) -> None:
    from facemux.models import synth
    from facemux.models.pretrain import JobSpec, prepare_work_dir, read_events, run_job

    data = {
        name: synth.make_dataset(synth.identity_from_seed(seed), 32, 64, seed=seed)[0]
        for name, seed in (("ann", 1), ("ben", 2))
    }

    def job(work: Path, batch: int) -> dict:
        spec = JobSpec(
            mode="pretrain",
            datasets=list(data),
            preset="tiny",
            steps=3,
            batch_size=batch,
            checkpoint_every=3,
            log_every=1,
            device="cuda",
        )
        prepare_work_dir(work, spec, data)
        return run_job(work)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    assert job(tmp_path / "probe", 8)["status"] == "succeeded"
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # Three times what batch 8 needed: the allocator itself refuses batch 1024 (a real CUDA
    # OutOfMemoryError, not a stand-in), and some halving of it fits.
    torch.cuda.set_per_process_memory_fraction(3 * peak / total)
    try:
        result = job(tmp_path / "big", 1024)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert result["status"] == "succeeded", result
    lowered = result["summary"]["batch_size"]
    assert 8 <= lowered < 1024
    notes = [e.get("message", "") for e in read_events(tmp_path / "big")[0]]
    assert f"CUDA out of memory: batch size lowered to {lowered}" in notes


def test_detection_batches_on_cuda_match_cpu() -> None:
    from common import two_face_scene
    from facemux.models.faces.blazeface import BlazeFaceDetector, batched_nms_mask, greedy_nms
    from facemux.service.detect_batcher import DetectionBatcher, DetectionStats
    from test_detect_batcher import _astronaut_at

    cpu, gpu = BlazeFaceDetector(), BlazeFaceDetector(device="cuda")
    stats: list[DetectionStats] = []
    b = DetectionBatcher(gpu, on_batch=stats.append, start=False)
    frames = [_astronaut_at(0, 0), two_face_scene(2), _astronaut_at(192, 32)]
    futures = [b.submit(gpu.prepare(f)) for f in frames]
    assert b.step() and [s.frames for s in stats] == [3]
    for frame, fut in zip(frames, futures, strict=True):
        want, got = cpu.detect(frame), gpu.faces(fut.result(0))
        assert len(want) == len(got)
        for a, c in zip(want, got, strict=True):
            np.testing.assert_allclose(a.box, c.box, atol=0.5)
    b.close()
    # torchvision's fused NMS (installed beside CUDA torch) keeps what the torch one keeps.
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 60, (4, 64, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(5, 30, (4, 64, 2))], -1))
    boxes = boxes.float().cuda()
    scores = torch.from_numpy(np.sort(rng.uniform(0, 1, (4, 64)), 1)[:, ::-1].copy()).cuda()
    scores = scores.float()
    assert torch.equal(batched_nms_mask(boxes, scores, 0.3), greedy_nms(boxes, scores, 0.3))


def test_device_resident_swap_on_cuda_matches_cpu() -> None:
    from facemux.models.faces import FaceSwapper, LandmarkPredictor, SwapOptions, make_detector
    from test_tensor_path import _frame_model, _frame_model_t

    photo = data.astronaut()

    def model_t(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        faces, masks = _frame_model_t(crops.cpu())
        return faces.to(crops.device), masks.to(crops.device)

    det, lms = make_detector("hog"), LandmarkPredictor(5)
    opts = SwapOptions(colour="reinhard")
    want = FaceSwapper(det, lms, device="cpu").swap(photo, _frame_model, opts)
    got = FaceSwapper(det, lms, device="cuda").swap(photo, _frame_model, opts, swap_crops_t=model_t)
    assert not got.frame_on_host and got.device_frame is not None and got.device_frame.is_cuda
    diff = np.abs(got.frame.astype(int) - want.frame.astype(int))
    assert diff.mean() < 0.05 and diff.max() <= 3


def test_batched_paste_on_cuda_is_the_per_face_paste() -> None:
    from facemux.models.faces.tensor import paste_faces_t
    from test_tensor_path import _crop_matrix, _paste_inputs

    frame = from_uint8(data.astronaut(), "cuda")
    base = _crop_matrix(64)
    ms = [base, base + np.array([[0, 0, 12.0], [0, 0, 3.0]]), base * 0.7]
    faces, masks = _paste_inputs(len(ms))
    faces, masks = faces.cuda(), masks.cuda()
    want = frame
    for j, m in enumerate(ms):
        want = paste_face_t(want, faces[j], masks[j], m)
    got = paste_faces_t(frame, faces, masks, ms)
    assert (got - want).abs().max().item() <= 1 / 255


@needs_nvjpeg
def test_nvjpeg_frames_never_come_to_the_host_with_blazeface_landmarks(
    tmp_path: Path, models: Models
) -> None:
    """JPEG in, JPEG out on the card, BlazeFace's own landmarks: Swap (with and without a
    face) and SwapStream leave no host copy of any input frame."""
    make_store(tmp_path / "store", models, ("alice",))
    photo = data.astronaut()
    settings = Settings(
        port=0,
        auth="off",
        store=tmp_path / "store",
        device="cuda",
        gpu_jpeg="on",
        detector="blazeface",
        detector_landmarks="detector",
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as client:
        client.wait_ready(60)
        jpeg = imageio.encode_image(photo, "JPEG", 95)
        assert client.swap_image(jpeg, "alice").faces_swapped == 1
        blank = imageio.encode_image(np.full_like(photo, 90), "JPEG", 95)
        assert client.swap_image(blank, "alice").faces_swapped == 0
        shifted = [imageio.encode_image(np.roll(photo, 3 * i, 1), "JPEG", 95) for i in range(6)]
        out = list(client.swap_stream(shifted, "alice", detect_every=3))
        assert [r.faces_swapped for r in out] == [1] * 6
        assert srv.app is not None
        reg = srv.app.metrics.registry
        for source in ("copied", "host"):
            labels = {"source": source}
            assert reg.get_sample_value("facemux_frame_host_reads_frames_total", labels) is None
        n = reg.get_sample_value(
            "facemux_frame_codec_frames_total", {"op": "encode", "codec": "nvjpeg"}
        )
        assert n == 8
