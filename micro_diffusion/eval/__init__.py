"""Evaluation: FID/KID with an offline Inception, CLIP score, the COCO zero-shot protocol, sampling sweeps.

The steps the console script calls: generate.sample, fid.fid, coco.coco, sweep.run_sweep, compose.compose_scores."""
