"""Evaluation metrics: the paper's FID, FVD, SSIM, E-FID (+ PSNR), weights-free lip-sync, blink
and expression measures for procedural data, and landmark mouth measures of real faces (`mouth`:
lip sync against the real video, LMD). Feature networks load from local files (`features`); the
platform's evaluate job (letstalk_platform.evaluate) runs the protocol.
"""

from .features import (EXPRESSION_SLICE, FVD_CLIP_FRAMES, ExpressionFeatures, FaceReconNet, I3DFeatures,
                       InceptionFeatures, load_face_recon, load_i3d, load_inception)
from .frames import (PSNR_CAP, check_frame_pair, crop_region, face_region, laplacian_variance, psnr, resize_frames,
                     seam_ratio, sharpness_ratio, ssim)
from .frechet import frechet_distance, frechet_distance_from_features, gaussian_stats
from .motion import (BLINK_MIN_SIZE, ProceduralFace, SyncScore, count_blinks, dark_fraction, expression_proxy,
                     eye_spread, mouth_opening, sync_envelope, sync_score)
from .mouth import (IDENTITY_NOT_MEASURED, MIN_SYNC_FRAMES, LandmarkSync, MouthTrack, audio_sync, landmark_sync, lmd,
                    mouth_track)

__all__ = [
    "frechet_distance", "frechet_distance_from_features", "gaussian_stats",
    "psnr", "ssim", "check_frame_pair", "resize_frames", "face_region", "crop_region", "PSNR_CAP",
    "seam_ratio", "laplacian_variance", "sharpness_ratio",
    "InceptionFeatures", "I3DFeatures", "ExpressionFeatures", "FaceReconNet", "load_inception", "load_i3d",
    "load_face_recon", "EXPRESSION_SLICE", "FVD_CLIP_FRAMES",
    "ProceduralFace", "SyncScore", "sync_score", "sync_envelope", "mouth_opening", "eye_spread", "count_blinks",
    "dark_fraction", "expression_proxy", "BLINK_MIN_SIZE",
    "MouthTrack", "mouth_track", "LandmarkSync", "landmark_sync", "audio_sync", "lmd", "MIN_SYNC_FRAMES",
    "IDENTITY_NOT_MEASURED",
]
