"""The engine: model families, checkpoint loading, block ranges, generation. No networking."""
