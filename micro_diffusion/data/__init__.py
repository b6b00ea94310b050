"""Latent shards: the MDS column schema (schema), shard integrity checks (integrity, the `data verify` command in
verify), the streaming training loader (loader, dataset), Streaming's shared memory of dead processes (shm), and the
dataset commands.

Nothing is imported here: `micro_diffusion.data.schema` and `integrity` stay light for the recipe checks, while the
loader modules and shm import Streaming (seconds).
"""
