"""Latent shards: the MDS column schema (schema), the streaming training loader (loader, dataset), dataset commands.

Nothing is imported here: `micro_diffusion.data.schema` stays light for the recipe checks, while the loader modules
import Streaming (seconds).
"""
