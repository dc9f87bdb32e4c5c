"""The child process that decodes a clip (docs/video.md, "Safety"): an animated picture through
Pillow, a video through PyAV (FFmpeg's libraries), so that a decoder's crash, hang or runaway
allocation on hostile bytes ends this process and never the caller's.

    python -m owl2_edge.clip_decode   < request line (JSON) [+ the clip's bytes]
                                      > frames: per frame "<IId" (width, height, seconds) + RGB

The parent (owl2_edge/clips.py) sets the bounds in the request and kills this process past its
time; here they are applied again from the inside: the address space and CPU time by
setrlimit, the decoded frames and pixels by counting. A refusal is one line on stderr and exit
code 2. Imports only the standard library, numpy, Pillow and PyAV, so it starts in a fraction
of a second.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys

FRAME_HEADER = struct.Struct("<IId")  # width, height, the frame's time in seconds
EXIT_REFUSED = 2


class Refused(Exception):
    """The clip cannot be read within the bounds; the message is the one line the parent shows."""


def pick_times(times: list[float], end_times: list[float], n: int, start: float | None,
               end: float | None) -> list[int]:
    """Indices of the frames shown at n times spaced evenly over [start, end) (each at the middle
    of its n-th of the span), in time order, each frame at most once: a clip with fewer frames
    than n in the span gives all of them. times[i] is when frame i is first shown, end_times[i]
    when it stops."""
    lo = times[0] if start is None else start
    hi = end_times[-1] if end is None else end
    inside = [i for i, (t0, t1) in enumerate(zip(times, end_times)) if t1 > lo and t0 < hi]
    if not inside:
        raise Refused(f"no frame is shown between {lo:g} s and {hi:g} s (the clip lasts "
                      f"{end_times[-1]:g} s)")
    if len(inside) <= n:
        return inside
    picked = []
    for k in range(n):
        t = lo + (k + 0.5) * (hi - lo) / n
        shown = [i for i in inside if times[i] <= t] or inside[:1]
        if shown[-1] not in picked:
            picked.append(shown[-1])
    return picked


def _check_size(width: int, height: int, req: dict) -> None:
    if width < 1 or height < 1:
        raise Refused(f"a frame of {width}x{height} pixels")
    if width > req["max_side"] or height > req["max_side"]:
        raise Refused(f"frames of {width}x{height} pixels: a side may be at most "
                      f"{req['max_side']:,} here")


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The frame's size, scaled down (aspect kept) when it has more than max_pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


# --- Animated pictures (GIF, APNG, WebP) ---------------------------------------------------------

def animation_frames(source, req: dict):
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = req["max_frame_pixels"] * 4  # Pillow's own bomb guard, kept on
    with Image.open(source) as image:
        _check_size(*image.size, req)
        times, end_times, t = [], [], 0.0
        # Each frame's time comes from the durations before it (Pillow reads them as it seeks).
        for index in range(req["max_decoded_frames"] + 1):
            try:
                image.seek(index)
            except EOFError:
                break
            if index == req["max_decoded_frames"]:
                raise Refused(f"more than {req['max_decoded_frames']:,} frames")
            duration = image.info.get("duration") or 100  # ms; browsers show 0 as ~100 ms
            times.append(t)
            t += max(float(duration), 10.0) / 1000
            end_times.append(t)
        for index in pick_times(times, end_times, req["frames"], req["start"], req["end"]):
            image.seek(index)
            frame = image.convert("RGB")
            size = _fit(*frame.size, req["max_frame_pixels"])
            if size != frame.size:
                frame = frame.resize(size, Image.Resampling.BICUBIC)
            yield frame.width, frame.height, times[index], frame.tobytes()


# --- Videos (MP4, MOV, WebM, MKV) ----------------------------------------------------------------

def video_frames(source, req: dict):
    import av
    with av.open(source, mode="r", metadata_errors="ignore") as container:
        if not container.streams.video:
            raise Refused("it holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        _check_size(stream.codec_context.width or 1, stream.codec_context.height or 1, req)
        # A pass over the packets' times (no decoding) picks the frames; each is then decoded
        # from the key frame before it (a seek), so a long clip costs its picked frames' groups
        # only. The frame bound holds both passes.
        times = []
        for packet in container.demux(stream):
            if packet.pts is not None and packet.time_base is not None and packet.size:
                times.append(float(packet.pts * packet.time_base))
            if len(times) > req["max_decoded_frames"]:
                raise Refused(f"more than {req['max_decoded_frames']:,} frames")
        if not times:
            raise Refused("it holds no frame")
        times.sort()
        step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.04
        end_times = times[1:] + [times[-1] + (step or 0.04)]
        picked = pick_times(times, end_times, req["frames"], req["start"], req["end"])
        decoded = 0
        for target in (times[i] for i in picked):
            container.seek(int(target / float(stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                decoded += 1
                if decoded > req["max_decoded_frames"]:
                    raise Refused(f"more than {req['max_decoded_frames']:,} frames")
                if frame.time is None or frame.time < target - 1e-6:
                    continue
                _check_size(frame.width, frame.height, req)
                width, height = _fit(frame.width, frame.height, req["max_frame_pixels"])
                rgb = frame.reformat(width=width, height=height, format="rgb24")
                yield width, height, target, rgb.to_ndarray().tobytes()
                break
            else:
                raise Refused(f"the frame at {target:g} s cannot be decoded")


def main() -> int:
    request = json.loads(sys.stdin.buffer.readline())
    memory = request["max_memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = request["max_cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    source = request["path"] or io.BytesIO(sys.stdin.buffer.read())
    read = animation_frames if request["kind"] == "animation" else video_frames
    out = sys.stdout.buffer
    try:
        for width, height, seconds, rgb in read(source, request):
            out.write(FRAME_HEADER.pack(width, height, seconds))
            out.write(rgb)
    except Refused as e:
        print(str(e), file=sys.stderr)
        return EXIT_REFUSED
    except MemoryError:
        print(f"decoding it needs more than {memory / 2**30:g} GiB of memory", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # the decoders' own errors on damaged data, each its own type
        line = " ".join(str(e).split())[:200] or type(e).__name__
        print(f"cannot be decoded ({line})", file=sys.stderr)
        return EXIT_REFUSED
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
