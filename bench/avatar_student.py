"""An avatar's distilled student against its teacher on the avatar's held-out seconds (issue 21's avatar bar).

    python jobs/avatar.py --video CLIP.mp4 --holdout-seconds 6 --out out/avatar --face-model FACE.task
    python jobs/distill.py --teacher out/avatar/runs/avatar-NAME/bundle --data out/avatar/shards \\
        --student-steps 2 --teacher-steps 16 --name avatar-NAME-2step ...
    python bench/avatar_student.py --avatar out/avatar --student STUDENT_BUNDLE --face-model FACE.task \\
        [--seeds 0 1 2]

Reads the avatar job's report.json (the clip, the training/held-out split, the teacher bundle, the
teacher's sampling steps). For each seed it renders the held-out seconds from their audio with the
teacher (DDIM at the report's sample_steps) and with the student (its own sampler and steps), from the
same portrait (the most typical training frame), and scores both against the real held-out frames as
the avatar job does (`letstalk_platform.avatar.score_holdout`: mouth r against the real mouth, its
shifted-real control, face PSNR, seam). Prints each run and the means; the issue's bar is the
student's mouth r within 0.05 of the teacher's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from letstalk.artifacts import ShardManifest
from letstalk.faces import FaceSettings
from letstalk.pipeline import LetsTalkPipeline
from letstalk_platform.avatar import avatar_faces, held_out, score_holdout, typical_frame

KEYS = ("mouth_r", "mouth_r_control", "face_psnr", "seam")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--avatar", required=True, help="the avatar job's --out folder (report.json, shards/)")
    p.add_argument("--student", required=True, help="the student's bundle folder")
    p.add_argument("--face-model", required=True, help="MediaPipe face_landmarker .task file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    out = Path(args.avatar)
    report = json.loads((out / "report.json").read_text())
    spec = ShardManifest.load(out / "shards").clip_spec
    faces = FaceSettings(**avatar_faces(args.face_model))
    holdout = held_out(report["video"], report["seconds_of_footage"]["train"], spec, faces)
    reference = typical_frame(out / "shards")
    models = {"teacher": (LetsTalkPipeline.from_pretrained(report["bundle"]), ("ddim", report["sample_steps"])),
              "student": (LetsTalkPipeline.from_pretrained(args.student), None)}
    print(f"{report['person']}: {len(holdout.frames)} held-out frames ({report['seconds_of_footage']['holdout']:g} s), "
          f"seeds {args.seeds}")
    rows: dict[str, list[dict]] = {name: [] for name in models}
    for seed in args.seeds:
        for name, (pipe, sampling) in models.items():
            sampler, steps = sampling or pipe.sampling()
            t0 = time.perf_counter()
            generated = np.concatenate(list(pipe.iter_clips(reference, holdout.audio, steps=steps, sampler=sampler,
                                                            seed=seed)))
            seconds = time.perf_counter() - t0
            figures, _ = score_holdout(generated, holdout.frames, holdout.frames_full, holdout.audio, spec,
                                       args.face_model, pipe.transformer.cfg.num_frames)
            figures |= {"render_s": seconds, "sampling": f"{sampler}-{steps}"}
            rows[name].append(figures)
            print(f"  seed {seed} {name:<8} {sampler}-{steps:<3} " +
                  "  ".join(f"{k} {figures[k]:.3f}" for k in KEYS) + f"  render {seconds:.1f} s", flush=True)
    means = {name: {k: statistics.mean(r[k] for r in runs) for k in (*KEYS, "render_s")} for name, runs in rows.items()}
    for name, m in means.items():
        print(f"mean {name:<8} " + "  ".join(f"{k} {m[k]:.3f}" for k in (*KEYS, "render_s")))
    gap = means["student"]["mouth_r"] - means["teacher"]["mouth_r"]
    print(f"student - teacher mouth r: {gap:+.3f} (bar: within ±0.05: {'met' if abs(gap) <= 0.05 else 'not met'}); "
          f"render {means['teacher']['render_s'] / means['student']['render_s']:.1f}x faster")


if __name__ == "__main__":
    main()
