"""torch.compile on the whole render path: inductor generates code for the transformer's blocks (a
minute on 2 cores with a cold cache), so this sits with the long runs, not in tests/lib."""

import numpy as np
import pytest

from letstalk.synthetic import draw_portrait, speech_like_audio

from conftest import live_pipeline

RENDER = {"steps": 3, "sampler": "ddim"}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.slow
def test_regional_compile_render_is_close_to_eager():
    """Inductor code generation on CPU: 63 s measured with a cold inductor cache on 2 shared cores
    (19 s warm). One clip, so one block shape to compile. Tolerance: 1 pixel level."""
    pipe, face = live_pipeline(), draw_portrait(96, seed=1)
    wave = speech_like_audio(0.32, seed=1)  # 8 frames: one clip
    ref = pipe.render(face, wave, **RENDER).frames
    pipe.set_inference(compile="regional")
    got = pipe.render(face, wave, **RENDER).frames
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
