"""Data preparation: convert image-caption sources to MDS image shards, precompute latents, download scripts."""
