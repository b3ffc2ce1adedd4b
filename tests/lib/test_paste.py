"""Paste-back (letstalk.paste.PasteBack): the generated face composited into the full portrait."""

import dataclasses

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from letstalk.media import load_video_frames, probe
from letstalk.paste import PasteBack
from letstalk.synthetic import speech_like_audio


def photo_and_face(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return photo, face


def test_outside_the_box_is_the_photo_and_the_middle_is_the_face():
    photo, face = photo_and_face()
    box = (40, 20, 120, 100)  # 80 x 80
    out = PasteBack(photo, box, feather=0.15)(face)
    assert out.shape == photo.shape and out.dtype == np.uint8
    outside = np.ones(photo.shape[:2], bool)
    outside[20:100, 40:120] = False
    assert np.array_equal(out[outside], photo[outside])  # not one level off
    # the middle (mask 1): the face scaled to the box, shifted by the seam's mean colour difference
    paste = PasteBack(photo, box, feather=0.15)
    scaled = np.asarray(Image.fromarray(face).resize((80, 80), Image.Resampling.BICUBIC), dtype=np.float32)
    shift = paste.region[paste.seam].mean(0) - scaled[paste.seam].mean(0)
    core = (slice(40, 60), slice(80, 100))  # rows 40-60, cols 80-100 of the photo: deep inside the box
    want = np.clip(np.rint(scaled[20:40, 40:60] + shift), 0, 255)
    assert np.abs(out[core].astype(float) - want).max() <= 1


def test_the_seam_is_feathered_and_the_colour_matched():
    photo = np.full((100, 100, 3), (120, 110, 100), np.uint8)
    face = np.full((24, 24, 3), (180, 60, 40), np.uint8)  # a face rendered with a colour cast
    out = PasteBack(photo, (20, 20, 80, 80))(face).astype(int)
    assert np.abs(out - (120, 110, 100)).max() <= 1  # the cast is removed: no visible box
    # a textured face: the jump across the box's edge is far smaller than a hard paste's
    _, face = photo_and_face(100, 100, seed=3)
    photo = np.broadcast_to(np.linspace(60, 200, 100, dtype=np.uint8)[None, :, None], (100, 100, 3)).copy()
    soft = PasteBack(photo, (20, 20, 80, 80))(face).astype(int)
    hard = photo.astype(int).copy()
    hard[20:80, 20:80] = np.asarray(Image.fromarray(face).resize((60, 60), Image.Resampling.BICUBIC))
    jump = lambda img: np.abs(img[20:80, 20] - img[20:80, 19]).mean()  # noqa: E731  (the left edge)
    assert jump(soft) < 0.2 * jump(hard)


def test_a_large_photo_is_scaled_to_max_side_with_even_sides():
    photo = np.zeros((1001, 1601, 3), np.uint8)
    paste = PasteBack(photo, (600, 200, 1000, 600), max_side=801)
    frame = paste(np.zeros((48, 48, 3), np.uint8))
    assert frame.shape == (500, 800, 3) and paste.size == (500, 800)
    x0, y0, x1, y1 = paste.box
    assert (x0, y0) == (300, 100) and abs((x1 - x0) - 200) <= 1 and abs((y1 - y0) - 200) <= 1


@pytest.mark.parametrize("box, match", [((0, 0, 200, 10), "not inside"), ((10, 10, 10, 20), "not inside")])
def test_bad_boxes_are_one_line_errors(box, match):
    photo, _ = photo_and_face()
    with pytest.raises(ValueError, match=match):
        PasteBack(photo, box)


def test_render_to_file_pastes_into_the_portrait(tmp_path):
    """The mp4 has the portrait's size; away from the face box its pixels are the portrait's (up to
    the H.264 encode)."""
    from letstalk.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.init_tiny(seed=0)
    rng = np.random.default_rng(1)
    photo = np.repeat(np.repeat(rng.integers(40, 200, (15, 20, 3), dtype=np.uint8), 8, 0), 8, 1)  # 120 x 160, blocky
    Image.fromarray(photo).save(tmp_path / "photo.png")
    sf.write(tmp_path / "a.wav", speech_like_audio(0.4, seed=0), 16000)
    result = pipe.render_to_file(tmp_path / "photo.png", tmp_path / "a.wav", tmp_path / "t.mp4", steps=2,
                                 sampler="ddim", paste_back=True)
    info = probe(tmp_path / "t.mp4")
    assert (info.width, info.height) == (160, 120) and result.num_frames == 10
    frames = load_video_frames(tmp_path / "t.mp4")
    x0, y0, x1, y1 = pipe.prepare(tmp_path / "photo.png", tmp_path / "a.wav").crop.box
    assert (x1 - x0, y1 - y0) == (120, 120)  # no face: the centre square
    left = frames[:, 8:-8, 4:x0 - 4].astype(int)  # the strip left of the box, away from the edges
    assert np.abs(left - photo[8:-8, 4:x0 - 4]).mean() < 4
    with pytest.raises(ValueError, match="no photo"):  # inputs handed on without the photo cannot paste back
        pipe.render_to_file(dataclasses.replace(pipe.prepare(photo, tmp_path / "a.wav"), photo=None), None,
                            tmp_path / "u.mp4", paste_back=True)


def test_inputs_for_a_renderer_carry_the_photo_only_to_paste_into():
    """PreparedInputs.for_renderer (the HTTP ingress): the paste-back decided once, on the photo as
    uploaded; the photo scaled to the video's size (what PasteBack would make of it, so it scales
    nothing again) or dropped."""
    from letstalk.inputs import InputSpec, prepare

    photo = np.random.default_rng(2).integers(0, 256, (300, 401, 3), dtype=np.uint8)
    inputs = prepare(photo, speech_like_audio(0.2, seed=0), InputSpec(image_size=48))
    assert np.array_equal(inputs.photo, photo) and inputs.crop.box == (50, 0, 350, 300)  # kept, as decoded
    assert inputs.pastes_back(None) and not inputs.pastes_back(False)
    assert inputs.for_renderer(False, 1920).photo is None
    # max_side 32 is below the model's 48 px: still pasted (the photo, not the scaled copy, decided)
    small = inputs.for_renderer(None, 32)
    assert small.photo.shape == (22, 32, 3) and small.crop.box == (4, 0, 28, 22) and small.pastes_back(None) is False
    direct = PasteBack(photo, inputs.crop.box, max_side=32)
    again = PasteBack(small.photo, small.crop.box, max_side=32)
    assert again.photo is small.photo and again.box == direct.box and np.array_equal(again.photo, direct.photo)
    assert inputs.for_renderer(True, 1920).photo.shape == (300, 400, 3)  # even sides (H.264 4:2:0)
    tiny = prepare(photo[:40, :40], speech_like_audio(0.2, seed=0), InputSpec(image_size=48))
    assert tiny.for_renderer(None, 1920).photo is None  # auto: no larger than the crop
    assert tiny.for_renderer(True, 1920).photo is tiny.photo  # already the video's size: as it is
