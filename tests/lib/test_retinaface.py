"""RetinaFace MobileNet-0.25 (letstalk.retinaface) and the default face detector built on it
(letstalk.faces.RetinaFaces): the shipped weights load strictly, the anchors line up with the heads,
and a real face is found small and off-centre, its landmarks mapped back into the frame.

The face cases read a real portrait by path (the realdata folder) and skip where it is absent."""

import math

import cv2
import numpy as np
import pytest
import torch

from letstalk import retinaface
from letstalk.faces import LANDMARKER, FaceSettings, MediaPipeFaces, RetinaFaces
from letstalk.portrait import load_image
from letstalk.retinaface import RetinaFace, RetinaFaceDetector, decode, nms, priors

PORTRAIT = "portraits/hallo_ref6_woman.jpg"  # 624x624, one frontal face
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_the_shipped_weights_load_strictly_and_the_priors_match_the_heads():
    net = RetinaFace()
    net.load_state_dict(retinaface.load_state_dict(), strict=True)  # every key, every shape
    assert sum(p.numel() for p in net.parameters()) == 426_608
    h, w = 101, 77  # odd sizes: each level has ceil(side / stride) cells
    with torch.no_grad():
        boxes, logits, points = net.eval()(torch.zeros(1, 3, h, w))
    cells = sum(math.ceil(h / s) * math.ceil(w / s) for s in retinaface.STEPS)
    assert boxes.shape == (1, 2 * cells, 4) and logits.shape == (1, 2 * cells, 2) and points.shape == (1, 2 * cells, 10)
    anchors = priors(h, w)
    assert anchors.shape == (2 * cells, 4)
    # the first cell of the first level: centre half a stride in, the level's two sizes
    assert anchors[0].tolist() == pytest.approx([4 / w, 4 / h, 10 / w, 10 / h])
    assert anchors[1].tolist() == pytest.approx([4 / w, 4 / h, 20 / w, 20 / h])
    assert anchors[2, 0].item() == pytest.approx(12 / w)  # then the next column


def test_zero_offsets_decode_to_the_anchor_and_nms_keeps_the_best_of_overlaps():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box, pts = decode(torch.zeros(1, 4), torch.zeros(1, 10), anchors)
    assert box[0].tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])
    assert pts.shape == (1, 5, 2) and (pts[0] == torch.tensor([0.5, 0.5])).all()
    box, _ = decode(torch.tensor([[1.0, 0.0, math.log(2) / 0.2, 0.0]]), torch.zeros(1, 10), anchors)
    assert box[0].tolist() == pytest.approx([0.5 + 0.02 - 0.2, 0.3, 0.5 + 0.02 + 0.2, 0.7])  # moved 0.1 x w, twice as wide
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    assert nms(boxes, torch.tensor([0.8, 0.9, 0.7]), 0.4).tolist() == [1, 2]


def test_no_face_in_a_flat_image():
    assert RetinaFaceDetector().detect(np.full((240, 320, 3), 128, np.uint8)) == []


@pytest.fixture(scope="module")
def portrait(realdata):
    return load_image(realdata / PORTRAIT)


def _place(image: np.ndarray, scale: float, canvas: tuple[int, int], x: int, y: int) -> np.ndarray:
    """image scaled by `scale`, pasted at (x, y) of a black (h, w) canvas."""
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    out = np.zeros((*canvas, 3), np.uint8)
    out[y:y + small.shape[0], x:x + small.shape[1]] = small
    return out


def test_a_small_face_at_the_edge_of_a_wide_frame_is_found_with_its_landmarks(portrait):
    with RetinaFaces() as faces, MediaPipeFaces(LANDMARKER, max_faces=1) as whole:
        big = faces.detect(portrait)
        assert len(big) == 1 and big[0].landmarks is not None
        ref = whole.detect(portrait)[0]  # the landmarker alone, on the portrait as it is
        # the same face: the crop path gives the landmarks the landmarker gives on the whole portrait
        assert np.abs(big[0].landmarks - ref.landmarks).max() < 0.03 * ref.size
        width = big[0].box[2] - big[0].box[0]
        scale = 48 / width  # the face 48 px wide ...
        frame = _place(portrait, scale, (405, 720), 0, 100)  # ... at the left edge of a 720x405 frame
        found = faces.detect(frame)
        assert len(found) == 1 and found[0].landmarks is not None
        expected = ref.landmarks * scale + np.array([0, 100], np.float32)
        assert np.abs(found[0].landmarks - expected).max() < 0.1 * 48  # mapped back into the frame's pixels
        assert 0 <= found[0].box[0] < found[0].box[2] <= portrait.shape[1] * scale
        # the landmarker alone misses it: its detector is made for selfies
        with MediaPipeFaces(LANDMARKER, max_faces=1) as alone:
            assert alone.detect(frame) == []


def test_the_default_face_settings_need_no_model_file():
    settings = FaceSettings()
    assert settings.detector == "retinaface" and settings.model is None
    detector = settings.detector_for(25)
    try:
        assert detector.name == "retinaface" and detector.detect(np.zeros((64, 64, 3), np.uint8)) == []
    finally:
        detector.close()
