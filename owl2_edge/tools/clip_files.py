"""Clip files written from frames: an animated GIF through Pillow, a video through PyAV (what the
tests, the fuzz and the benchmarks hand to owl2-edge as a user's clip would come).

    write_gif(frames, path, frame_ms)
    write_video(frames, path, fps)        container from the suffix: .mp4 .mov .mkv (H.264), .webm (VP9)
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# The codec each container is written with: the common one for it.
CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


def write_gif(frames: list[Image.Image], path: Path, frame_ms: int = 500) -> None:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def write_video(frames: list[Image.Image], path: Path, fps: int = 2) -> None:
    import av
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CODECS[path.suffix.lower()], rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
