"""Small helpers every layer may use: seeds, devices, sizes, image files and JSON-lines files (no project imports)."""
