"""Bytes on disk: safetensors files, checkpoints, packed formats, repacked copies, where each expert lies."""
