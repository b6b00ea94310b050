"""Evaluation: FID/KID with an offline Inception, CLIP score, the COCO zero-shot protocol, sampling sweeps."""
